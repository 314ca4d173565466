"""The Chroma collections both roles read: memory, the persona registry, and the examples
of tune requests (kept here for the trainer, a train job's claim check points at them).

Memory is one collection per persona (`<CHROMADB_COLLECTION>_p_<digest of the DID>`, the
DID in the collection's metadata), one record per interaction, id derived from persona and
event id, so a replay adds nothing. Recall then searches only that persona's index:
measured with 100,000 memories of 1,000 personas, p50 1.5 ms against 87 ms for one shared
collection filtered by persona (`bench/recall_bench.py`). A store written by an earlier
version in one shared collection is moved into this layout when it is first opened.
Chroma's client is synchronous, so each call runs in a worker thread and the event loop
keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import Settings
from ..contract.ids import digest
from ..runtime import logs, metrics

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Imported after the offline switches above.
import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.errors import NotFoundError

Vector = list[float]
T = TypeVar("T")
SHARED = ("personas", "examples")
MEMORY = "memory:"  # a target naming one persona's memory: MEMORY + persona_id
SPACE = {"hnsw": {"space": "cosine"}}
WRITES = {"add", "upsert", "update", "delete"}
# What a read of a persona without a memory collection answers.
EMPTY: dict[str, Any] = {
    "get": {"ids": [], "documents": [], "metadatas": [], "embeddings": None},
    "query": {"ids": [[]], "documents": [[]], "metadatas": [[]], "distances": [[]]},
    "count": 0,
}
# Chroma's SQLite backend binds one variable per id; stay well under its limit per call.
IDS_PER_CALL = 1000
Metadata = dict[str, str | int | float | bool | list[str] | list[int] | list[float] | list[bool]]


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


def memory_of(persona_id: str) -> str:
    """The target naming `persona_id`'s memory collection, for the methods below."""
    return MEMORY + persona_id


def memory_collection_name(base: str, persona_id: str) -> str:
    return f"{base}_p_{digest('memory', persona_id, length=24)}"


def migrate_shared_memory(client: ClientAPI, base: str) -> int:
    """Move the records of the shared memory collection `base` (the earlier layout) into
    per-persona collections, then drop it; returns how many were moved. Safe to repeat:
    adding an id that is already there changes nothing."""
    if base not in {c.name for c in client.list_collections()}:
        return 0
    shared = client.get_collection(base, embedding_function=None)
    moved = 0
    while True:
        page = shared.get(limit=IDS_PER_CALL, offset=moved, include=["embeddings", "documents", "metadatas"])
        if not page["ids"]:
            break
        by_persona: dict[str, list[int]] = {}
        for i, meta in enumerate(page["metadatas"]):
            by_persona.setdefault(str(meta["persona_id"]), []).append(i)
        for persona, rows in by_persona.items():
            target = client.get_or_create_collection(
                memory_collection_name(base, persona),
                embedding_function=None,
                configuration=SPACE,
                metadata={"persona_id": persona},
            )
            target.add(
                ids=[page["ids"][i] for i in rows],
                embeddings=[page["embeddings"][i] for i in rows],
                documents=[page["documents"][i] for i in rows],
                metadatas=[page["metadatas"][i] for i in rows],
            )
        moved += len(page["ids"])
    client.delete_collection(base)
    logs.event("memory_migrated", records=moved, layout="one collection per persona")
    return moved


class Collections:
    """Per-persona memory, the persona registry and tune examples, all in Chroma.

    Methods take a target: "personas", "examples", or `memory_of(persona_id)`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: ClientAPI | None = None
        self._collections: dict[str, Collection] = {}

    def _open(self, target: str, create: bool = True) -> Collection | None:
        # Opened lazily and re-opened after a failure, so a Chroma server that was down at
        # start or restarted later is picked up by the retry of the failed call.
        base = self.settings.chromadb_collection
        if self.client is None:
            client = connect(self.settings)
            migrate_shared_memory(client, base)
            self.client = client
        if target not in self._collections:
            if target.startswith(MEMORY):
                persona = target.removeprefix(MEMORY)
                name = memory_collection_name(base, persona)
                if create:
                    self._collections[target] = self.client.get_or_create_collection(
                        name, embedding_function=None, configuration=SPACE, metadata={"persona_id": persona}
                    )
                else:
                    try:  # reads never create: a recall for any DID must not add a collection
                        self._collections[target] = self.client.get_collection(name, embedding_function=None)
                    except NotFoundError:
                        return None
            elif target in SHARED:
                self._collections[target] = self.client.get_or_create_collection(
                    f"{base}_{target}", embedding_function=None, configuration=SPACE
                )
            else:
                raise ValueError(f"unknown collection {target!r}")
        return self._collections[target]

    async def call(self, target: str, method: str, **kwargs: Any) -> Any:
        """Run one collection call in a thread (a read of a missing memory collection answers empty)."""

        def run() -> Any:
            collection = self._open(target, create=method in WRITES)
            if collection is None:
                return EMPTY[method]
            try:
                return getattr(collection, method)(**kwargs)
            except NotFoundError:
                if method in WRITES or not target.startswith(MEMORY):
                    raise
                # Deleted since this handle opened it (a persona erased elsewhere), and maybe
                # made anew since (the persona came back): read the one there is, if any.
                self._collections.pop(target, None)
                again = self._open(target, create=False)
                return EMPTY[method] if again is None else getattr(again, method)(**kwargs)

        return await self._in_thread(run)

    async def _in_thread(self, run: Callable[[], T]) -> T:
        """Run a blocking Chroma call in a thread; on failure drop the handles and re-raise."""
        try:
            return await asyncio.to_thread(run)
        except Exception:
            self.client, self._collections = None, {}
            raise

    async def memory_personas(self) -> list[str]:
        """Every persona that has a memory collection."""

        def run() -> list[str]:
            self._open("personas")
            assert self.client is not None
            prefix = f"{self.settings.chromadb_collection}_p_"
            return sorted(
                str(c.metadata["persona_id"])
                for c in self.client.list_collections()
                if c.name.startswith(prefix) and c.metadata and "persona_id" in c.metadata
            )

        return await self._in_thread(run)

    def location(self) -> str:
        """Where Chroma is sought: `Chroma server HOST:PORT` or `Chroma at PATH` (embedded)."""
        s = self.settings
        if s.chromadb_host:
            return f"Chroma server {s.chromadb_host}:{s.chromadb_port}"
        return f"Chroma at {s.chromadb_path}"

    async def problem(self) -> str | None:
        """None when Chroma answers a count, else what is wrong, naming where it was sought."""
        try:
            await self.call("personas", "count")
            return None
        except Exception as exc:
            return f"{self.location()}: {logs.describe(exc)}"

    async def problem_at_start(self, timeout_s: float) -> str | None:
        """`problem()` within `timeout_s`, logging a WARNING that names the server and what to
        check when there is one. Not fatal: every call retries, and a server that comes up
        later is used then."""
        try:
            problem = await asyncio.wait_for(self.problem(), timeout_s)
        except TimeoutError:
            problem = f"{self.location()}: no answer within {timeout_s:.0f} s"
        if problem is not None:
            logs.event(
                "chroma_unreachable",
                logging.WARNING,
                problem=problem,
                advice="check that the Chroma server is running and that CHROMADB_HOST and CHROMADB_PORT name it; "
                "the daemon keeps retrying and is not ready until Chroma answers",
            )
        return problem

    async def existing_ids(self, target: str, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), IDS_PER_CALL):
            got = await self.call(target, "get", ids=ids[start : start + IDS_PER_CALL], include=[])
            found.update(got["ids"])
        return found

    async def add(self, target: str, records: list[Record]) -> None:
        """Add records; ids must be unique here. Chroma makes re-adding a stored id a no-op."""
        if records:
            started = time.perf_counter()
            await self.call(
                target,
                "add",
                ids=[r.id for r in records],
                embeddings=[r.embedding for r in records],
                documents=[r.document for r in records],
                metadatas=[r.metadata for r in records],
            )
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def upsert(self, target: str, record: Record) -> None:
        started = time.perf_counter()
        await self.call(
            target,
            "upsert",
            ids=[record.id],
            embeddings=[record.embedding],
            documents=[record.document],
            metadatas=[record.metadata],
        )
        metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def update_metadata(self, target: str, ids: list[str], patch: Metadata) -> None:
        for start in range(0, len(ids), IDS_PER_CALL):
            chunk = ids[start : start + IDS_PER_CALL]
            started = time.perf_counter()
            await self.call(target, "update", ids=chunk, metadatas=[dict(patch) for _ in chunk])
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def delete(self, target: str, ids: list[str]) -> None:
        """Delete records by id (ids not stored are ignored)."""
        for start in range(0, len(ids), IDS_PER_CALL):
            await self.call(target, "delete", ids=ids[start : start + IDS_PER_CALL])

    async def drop_memory(self, persona_id: str) -> None:
        """Delete a persona's whole memory collection; nothing when it has none."""

        def run() -> None:
            self._open("personas")
            assert self.client is not None
            self._collections.pop(memory_of(persona_id), None)
            with contextlib.suppress(NotFoundError):
                self.client.delete_collection(memory_collection_name(self.settings.chromadb_collection, persona_id))

        await self._in_thread(run)

    async def get(
        self,
        target: str,
        *,
        ids: list[str] | None = None,
        where: dict[str, Any] | None = None,
        embeddings: bool = False,
        limit: int | None = None,
    ) -> list[Record]:
        """Records by ids (in Chroma's order, missing ids left out) or by a `where` filter
        (at most `limit` of them), with their metadata (and embeddings when asked) but not
        their documents."""
        if ids is None:
            return await self._get(target, None, where, embeddings, **({"limit": limit} if limit else {}))
        found: list[Record] = []
        for start in range(0, len(ids), IDS_PER_CALL):
            found += await self._get(target, ids[start : start + IDS_PER_CALL], where, embeddings)
        return found

    async def untrained(self, target: str) -> tuple[list[str], float | None]:
        """The ids of a memory collection's records not yet in a train job (`job_id` ""),
        and the oldest one's `ingested_ts` (None when there are none): ids and one
        timestamp, never the documents, embeddings or the rest of the metadata."""
        where = {"job_id": ""}
        ids = (await self.call(target, "get", where=where, include=[]))["ids"]
        if not ids:
            return [], None
        # Chroma returns records in the order they were added, so the first is the oldest.
        first = await self.call(target, "get", where=where, limit=1, include=["metadatas"])
        return list(ids), float(first["metadatas"][0]["ingested_ts"])

    async def newest(self, target: str, n: int, *, embeddings: bool = False) -> list[Record]:
        """At most the `n` most recently added records of a memory collection, oldest first:
        what a job reads, whatever the length of the persona's history. Chroma returns a
        collection's records in the order they were added."""
        total = int(await self.call(target, "count"))
        return await self._get(target, None, None, embeddings, limit=n, offset=max(0, total - n))

    async def _get(
        self,
        target: str,
        ids: list[str] | None,
        where: dict[str, Any] | None,
        embeddings: bool,
        **page: int,
    ) -> list[Record]:
        # Every field a reader needs is in the metadata: documents (the embedded text) stay
        # in Chroma, which keeps a batcher rebuild or a job's read small.
        include = ["metadatas"] + (["embeddings"] if embeddings else [])
        found = await self.call(target, "get", ids=ids, where=where, include=include, **page)
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

    async def query(self, target: str, vector: Vector, k: int) -> list[Record]:
        found = await self.call(
            target,
            "query",
            query_embeddings=[vector],
            n_results=k,
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
