"""The Chroma collections both roles read: memory, the persona registry, and the examples
of tune requests (kept here for the trainer, a train job's claim check points at them).

One memory record per interaction, id derived from persona and event id, so a replay adds
nothing. Every read is filtered to one persona. Chroma's client is synchronous, so each
call runs in a worker thread and the event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..runtime import metrics

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Imported after the offline switches above.
import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection

Vector = list[float]
COLLECTIONS = ("memory", "personas", "examples")
# Chroma's SQLite backend binds one variable per id; stay well under its limit per call.
IDS_PER_CALL = 1000
Metadata = dict[str, str | int | float | bool]


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
        self._collections: dict[str, Collection] = {}

    def _open(self, which: str) -> Collection:
        # Opened lazily and re-opened after a failure, so a Chroma server that was down at
        # start or restarted later is picked up by the retry of the failed call.
        if not self._collections:
            self.client = connect(self.settings)
            space = {"hnsw": {"space": "cosine"}}
            name = self.settings.chromadb_collection
            names = {"memory": name, "personas": f"{name}_personas", "examples": f"{name}_examples"}
            self._collections = {
                key: self.client.get_or_create_collection(full, embedding_function=None, configuration=space)
                for key, full in names.items()
            }
        return self._collections[which]

    async def call(self, which: str, method: str, **kwargs: Any) -> Any:
        """Run one collection call in a thread; on failure drop the handles and re-raise."""

        def run() -> Any:
            return getattr(self._open(which), method)(**kwargs)

        try:
            return await asyncio.to_thread(run)
        except Exception:
            self._collections = {}
            raise

    async def problem(self) -> str | None:
        """None when Chroma answers a count, else what is wrong, naming where it was sought."""
        s = self.settings
        where = (
            f"Chroma server {s.chromadb_host}:{s.chromadb_port}" if s.chromadb_host else f"Chroma at {s.chromadb_path}"
        )
        try:
            await self.call("memory", "count")
            return None
        except Exception as exc:
            return f"{where}: {type(exc).__name__}: {exc}"[:300]

    async def existing_ids(self, which: str, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), IDS_PER_CALL):
            got = await self.call(which, "get", ids=ids[start : start + IDS_PER_CALL], include=[])
            found.update(got["ids"])
        return found

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
        for start in range(0, len(ids), IDS_PER_CALL):
            chunk = ids[start : start + IDS_PER_CALL]
            started = time.perf_counter()
            await self.call(which, "update", ids=chunk, metadatas=[dict(patch) for _ in chunk])
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def get(
        self,
        which: str,
        *,
        ids: list[str] | None = None,
        where: dict[str, Any] | None = None,
        embeddings: bool = False,
    ) -> list[Record]:
        """Records by ids (in Chroma's order, missing ids left out) or by a `where` filter,
        with their metadata (and embeddings when asked) but not their documents."""
        if ids is None:
            return await self._get(which, None, where, embeddings)
        found: list[Record] = []
        for start in range(0, len(ids), IDS_PER_CALL):
            found += await self._get(which, ids[start : start + IDS_PER_CALL], where, embeddings)
        return found

    async def _get(
        self, which: str, ids: list[str] | None, where: dict[str, Any] | None, embeddings: bool
    ) -> list[Record]:
        # Every field a reader needs is in the metadata: documents (the embedded text) stay
        # in Chroma, which keeps a batcher rebuild or a job's read small.
        include = ["metadatas"] + (["embeddings"] if embeddings else [])
        found = await self.call(which, "get", ids=ids, where=where, include=include)
        vectors = found.get("embeddings")
        return [
            Record(
                id=found["ids"][i],
                document="",
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
