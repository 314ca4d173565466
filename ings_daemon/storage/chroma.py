"""The Chroma collections both roles read: memory, the persona registry, and the examples
of tune requests (kept here for the trainer, a train job's claim check points at them).

Memory is kept in persona buckets (`storage.buckets`): one record per interaction, tagged
with its `persona_id`, id derived from persona and event id, so a replay adds nothing.
Every read and delete of `memory_of(persona)` is filtered by that persona inside its one
bucket, so a recall reads only that persona's memories. Chroma's client is synchronous,
so each call runs in a worker thread and the event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import Settings
from ..runtime import logs, metrics
from . import buckets
from .buckets import IDS_PER_CALL, SPACE

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Imported after the offline switches above.
import chromadb
from chromadb.api import AdminAPI, ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.errors import AuthorizationError, ChromaAuthError, NotFoundError

Vector = list[float]
T = TypeVar("T")
SHARED = ("personas", "examples", "feedback")
MEMORY = "memory:"  # a target naming one persona's memory: MEMORY + persona_id
WRITES = {"add", "upsert", "update", "delete"}
Metadata = dict[str, str | int | float | bool | list[str] | list[int] | list[float] | list[bool]]
Where = dict[str, Any]
DEFAULT_PLACE = ("default_tenant", "default_database")


class ChromaRefused(ConnectionError):
    """Chroma answered but will not serve this daemon (its token, its tenant). Retried like
    a server that is away (a ConnectionError is transient to the router), since only the
    operator can fix it; the message names the setting, never the token."""


@dataclass(frozen=True)
class Record:
    id: str
    document: str
    metadata: Metadata
    embedding: Vector | None = None
    distance: float | None = None


def connect(settings: Settings) -> ClientAPI:
    """A client for CHROMADB_HOST (with its token, TLS, tenant and database) or, without a
    host, the embedded store at CHROMADB_PATH. The token goes only into the client's auth
    provider, never into a log line."""
    options: dict[str, Any] = {"anonymized_telemetry": False}
    if settings.chromadb_ssl_ca_file is not None:
        options["chroma_server_ssl_verify"] = str(settings.chromadb_ssl_ca_file)
    if settings.chromadb_auth_token is not None:
        options.update(
            chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
            chroma_client_auth_credentials=settings.chromadb_auth_token.get_secret_value(),
            chroma_auth_token_transport_header=settings.chromadb_auth_header,
        )
    client_settings = chromadb.Settings(**options)
    place = {"tenant": settings.chromadb_tenant, "database": settings.chromadb_database}
    if settings.chromadb_host:
        where = {"host": settings.chromadb_host, "port": settings.chromadb_port, "ssl": settings.chromadb_ssl}
        if (settings.chromadb_tenant, settings.chromadb_database) != DEFAULT_PLACE:
            ensure_database(chromadb.AdminClient(chromadb.Settings(**options, **http_settings(settings))), settings)
        client: ClientAPI = chromadb.HttpClient(**where, settings=client_settings, **place)
        return client
    settings.chromadb_path.mkdir(parents=True, exist_ok=True)
    if (settings.chromadb_tenant, settings.chromadb_database) != DEFAULT_PLACE:
        local = {"is_persistent": True, "persist_directory": str(settings.chromadb_path)}
        ensure_database(chromadb.AdminClient(chromadb.Settings(**options, **local)), settings)
    return chromadb.PersistentClient(path=str(settings.chromadb_path), settings=client_settings, **place)


def http_settings(settings: Settings) -> dict[str, Any]:
    """What chromadb.Settings needs to reach CHROMADB_HOST (an AdminClient takes no host)."""
    return {
        "chroma_api_impl": "chromadb.api.fastapi.FastAPI",
        "chroma_server_host": settings.chromadb_host,
        "chroma_server_http_port": settings.chromadb_port,
        "chroma_server_ssl_enabled": settings.chromadb_ssl,
    }


def ensure_database(admin: AdminAPI, settings: Settings) -> None:
    """Create CHROMADB_DATABASE in CHROMADB_TENANT when it is missing. Raises ChromaRefused
    naming the setting when the tenant does not exist (the daemon never creates tenants:
    on a shared server that is the operator's call)."""
    tenant, database = settings.chromadb_tenant, settings.chromadb_database
    try:
        admin.get_tenant(tenant)
    except NotFoundError as exc:
        raise ChromaRefused(f"CHROMADB_TENANT {tenant!r} does not exist on this server") from exc
    try:
        admin.get_database(database, tenant=tenant)
    except NotFoundError:
        admin.create_database(database, tenant=tenant)
        logs.event("chroma_database_created", tenant=tenant, database=database)


def memory_of(persona_id: str) -> str:
    """The target naming `persona_id`'s memory, for the methods below."""
    return MEMORY + persona_id


def scoped(persona: str, where: Where | None) -> Where:
    """`where` narrowed to one persona's records (Chroma takes one operator per level)."""
    mine = {"persona_id": persona}
    return mine if not where else {"$and": [where, mine]}


class Collections:
    """Memory in persona buckets, the persona registry and tune examples, all in Chroma.

    Methods take a target: "personas", "examples", or `memory_of(persona_id)`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: ClientAPI | None = None
        self._collections: dict[str, Collection] = {}

    def _connected(self) -> ClientAPI:
        # Opened lazily and re-opened after a failure, so a Chroma server that was down at
        # start or restarted later is picked up by the retry of the failed call.
        if self.client is None:
            client = connect(self.settings)
            buckets.migrate(client, self.settings.chromadb_collection)
            self.client = client
        return self.client

    def _cached(self, name: str, open_collection: Callable[[ClientAPI], Collection]) -> Collection:
        if name not in self._collections:
            self._collections[name] = open_collection(self._connected())
        return self._collections[name]

    def _bucket(self, bucket: int) -> Collection:
        base = self.settings.chromadb_collection
        return self._cached(buckets.bucket_name(base, bucket), lambda c: buckets.open_bucket(c, base, bucket))

    def _index_collection(self) -> Collection:
        base = self.settings.chromadb_collection
        return self._cached(buckets.index_name(base), lambda c: buckets.open_index(c, base))

    def _open(self, target: str) -> tuple[Collection, str | None]:
        """The collection a target lives in, and the persona it is narrowed to (if any)."""
        if target.startswith(MEMORY):
            persona = target.removeprefix(MEMORY)
            return self._bucket(buckets.bucket_of(persona)), persona
        if target in SHARED:
            name = f"{self.settings.chromadb_collection}_{target}"
            opened = self._cached(
                name, lambda c: c.get_or_create_collection(name, embedding_function=None, configuration=SPACE)
            )
            return opened, None
        raise ValueError(f"unknown collection {target!r}")

    async def call(self, target: str, method: str, **kwargs: Any) -> Any:
        """Run one collection call in a thread. On a memory target every read, update and
        delete is narrowed to the persona (a `count` counts only its records, an update of
        another persona's id changes nothing), and a record written must carry its
        `persona_id` and may not replace another persona's."""

        def run() -> Any:
            collection, persona = self._open(target)
            if persona is None:
                return getattr(collection, method)(**kwargs)
            if method in ("add", "upsert"):
                if any(m.get("persona_id") != persona for m in kwargs["metadatas"]):
                    raise ValueError(f"a record written to {target} must carry persona_id {persona!r}")
                others = {"persona_id": {"$ne": persona}}
                if method == "upsert" and collection.get(ids=kwargs["ids"], where=others, include=[])["ids"]:
                    raise ValueError(f"an id written to {target} belongs to another persona")
                self._index({persona})
            if method == "update":
                mine = set(collection.get(ids=kwargs["ids"], where=scoped(persona, None), include=[])["ids"])
                keep = [n for n, i in enumerate(kwargs["ids"]) if i in mine]
                if not keep:
                    return None
                kept = {k: [v[n] for n in keep] if isinstance(v, list) else v for k, v in kwargs.items()}
                return collection.update(**kept)
            if method == "count":
                return len(collection.get(where=scoped(persona, None), include=[])["ids"])
            if method in ("get", "query", "delete"):
                kwargs["where"] = scoped(persona, kwargs.get("where"))
            return getattr(collection, method)(**kwargs)

        return await self._in_thread(run)

    def _index(self, personas: set[str]) -> None:
        """Put personas into the index before their memories are written, on every write
        (one call): an entry without memories (a crash in between) only counts a persona
        early, and no cache can miss a persona another instance erased meanwhile."""
        buckets.index_personas(self._index_collection(), personas)

    def _indexed_personas(self) -> set[str]:
        index = self._index_collection()
        found: set[str] = set()
        while page := index.get(limit=IDS_PER_CALL, offset=len(found), include=[])["ids"]:
            found.update(page)
        return found

    async def _in_thread(self, run: Callable[[], T]) -> T:
        """Run a blocking Chroma call in a thread; on failure drop the handles and re-raise."""
        try:
            return await asyncio.to_thread(run)
        except (ChromaAuthError, AuthorizationError) as exc:
            self.client, self._collections = None, {}
            token = self.settings.chromadb_auth_token
            what = "refused CHROMADB_AUTH_TOKEN" if token else "wants a token and CHROMADB_AUTH_TOKEN is not set"
            raise ChromaRefused(f"the server {what} ({logs.describe(exc)})") from exc
        except Exception:
            self.client, self._collections = None, {}
            raise

    async def memory_personas(self) -> list[str]:
        """Every persona that has memory (read from the index, not the memories)."""
        return sorted(await self._in_thread(self._indexed_personas))

    async def add_memories(self, records: list[Record]) -> None:
        """Write memories of any number of personas (each record's metadata names its
        `persona_id`): the new personas' index entries in one call, then one call per
        bucket, which is what keeps a batch of many personas as cheap as one of a single
        persona. Re-adding a stored id changes nothing."""
        by_bucket: dict[int, list[Record]] = {}
        for r in records:
            by_bucket.setdefault(buckets.bucket_of(str(r.metadata["persona_id"])), []).append(r)

        def run() -> None:
            self._index({str(r.metadata["persona_id"]) for r in records})
            for bucket, rows in sorted(by_bucket.items()):
                self._bucket(bucket).add(
                    ids=[r.id for r in rows],
                    embeddings=[r.embedding for r in rows],
                    documents=[r.document for r in rows],
                    metadatas=[r.metadata for r in rows],
                )

        if records:
            started = time.perf_counter()
            await self._in_thread(run)
            metrics.CHROMA_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def stored_memories(self, ids_by_persona: dict[str, list[str]]) -> list[Record]:
        """The stored memories among these ids (persona -> ids), metadata only, one read
        per bucket and IDS_PER_CALL ids. Read by id alone (a filter by persona doubled the
        read's cost); a record is ids' only if it carries the persona asked for, which it
        always does, since a memory's id is derived from its persona and event."""
        owner = {i: p for p, ids in ids_by_persona.items() for i in ids}
        by_bucket: dict[int, list[str]] = {}
        for persona, ids in ids_by_persona.items():
            by_bucket.setdefault(buckets.bucket_of(persona), []).extend(ids)
        found: list[Record] = []
        for bucket, ids in sorted(by_bucket.items()):
            for start in range(0, len(ids), IDS_PER_CALL):
                got = records_of(await self._read(bucket, ids=ids[start : start + IDS_PER_CALL]))
                found += [r for r in got if r.metadata.get("persona_id") == owner[r.id]]
        return found

    async def _read(self, bucket: int, **kwargs: Any) -> Any:
        """One `get` of a bucket's records with their metadata."""
        return await self._in_thread(lambda: self._bucket(bucket).get(include=["metadatas"], **kwargs))

    async def scan(self, where: Where, first_bucket: int = 0) -> AsyncGenerator[tuple[int, list[Record]], None]:
        """(bucket, page of records) for every memory matching `where`, bucket by bucket
        from `first_bucket`, IDS_PER_CALL at a time, metadata only, in the order written.
        A page is read after the caller is done with the one before; deleting in between
        shifts what the next page holds."""
        for bucket in range(first_bucket, buckets.BUCKETS):
            offset = 0
            while True:
                got = await self._read(bucket, where=where, limit=IDS_PER_CALL, offset=offset)
                if not got["ids"]:
                    break
                offset += len(got["ids"])
                yield bucket, records_of(got)

    def location(self) -> str:
        """Where Chroma is sought: `Chroma server HOST:PORT` or `Chroma at PATH` (embedded)."""
        s = self.settings
        place = (
            ""
            if (s.chromadb_tenant, s.chromadb_database) == DEFAULT_PLACE
            else f" ({s.chromadb_tenant}/{s.chromadb_database})"
        )
        if s.chromadb_host:
            return f"Chroma server {'https' if s.chromadb_ssl else 'http'}://{s.chromadb_host}:{s.chromadb_port}{place}"
        return f"Chroma at {s.chromadb_path}{place}"

    async def problem(self) -> str | None:
        """None when Chroma answers a count, else what is wrong, naming where it was sought
        (and, when the server refused this daemon, the setting to check)."""
        try:
            await self.call("personas", "count")
            return None
        except Exception as exc:
            return f"{self.location()}: {logs.describe(exc)}"

    async def problem_at_start(self, timeout_s: float) -> str | None:
        """`problem()` within `timeout_s`, logging one WARNING that names the server and
        what to check when there is one. Not fatal: every call retries, and a server that
        comes up (or a token that is fixed on it) later is used then."""
        try:
            problem = await asyncio.wait_for(self.problem(), timeout_s)
        except TimeoutError:
            problem = f"{self.location()}: no answer within {timeout_s:.0f} s"
        if problem is not None:
            if "ChromaRefused" in problem:
                advice = "the setting named above; the daemon keeps retrying and is not ready until Chroma answers"
            else:
                advice = "check that the Chroma server is running and that CHROMADB_HOST and CHROMADB_PORT name it; "
                advice += "the daemon keeps retrying and is not ready until Chroma answers"
            logs.event("chroma_unreachable", logging.WARNING, problem=problem, advice=advice)
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
        """Delete all of a persona's memories and its index entry; nothing when it has none."""

        def run() -> None:
            self._open(memory_of(persona_id))[0].delete(where=scoped(persona_id, None))
            self._index_collection().delete(ids=[persona_id])

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

    async def untrained(self) -> dict[str, tuple[set[str], float]]:
        """Every persona's memories not yet in a train job (`job_id` ""): persona -> (their
        ids, the oldest one's `ingested_ts`), from one scan of the buckets that reads only
        those records' metadata."""
        found: dict[str, tuple[set[str], float]] = {}
        async for _, page in self.scan({"job_id": ""}):
            for r in page:
                persona = str(r.metadata["persona_id"])
                ids, oldest = found.get(persona, (set(), float("inf")))
                ids.add(r.id)
                found[persona] = ids, min(oldest, float(r.metadata["ingested_ts"]))  # type: ignore[arg-type]
        return found

    async def newest(self, target: str, n: int, *, embeddings: bool = False) -> list[Record]:
        """At most the `n` most recently added memories of a persona, oldest first: what a
        job reads, whatever the length of the persona's history. Chroma returns a filtered
        read in the order the records were added."""
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
        include = ["metadatas"] + (["embeddings"] if embeddings else [])
        found = await self.call(target, "get", ids=ids, where=where, include=include, **page)
        return records_of(found)

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


def records_of(found: Any) -> list[Record]:
    """Chroma's answer to a `get` as records (documents left empty: every field a reader
    needs is in the metadata, which keeps a batcher rebuild or a job's read small)."""
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
