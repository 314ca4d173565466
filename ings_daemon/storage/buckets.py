"""Where a persona's memories live: a fixed number of persona buckets, each one Chroma
collection holding many personas' records, every record tagged with its `persona_id`.

Why buckets (`bench/personas_bench.py`, on a `chroma run` server, chromadb 1.5.9): a Chroma
collection costs about 2.6 MiB of server memory however few records it holds, so the
earlier layout (one collection per persona) grew by 2.6 GiB per 1,000 personas. In buckets
the cost follows the records (20,000 personas x 10 memories: about 0.7 GiB).

Why 32: a recall filters by `persona_id` inside one bucket, so it reads more as buckets
grow (p50 about 3 ms + 0.7 ms per 1,000 records in the bucket); a write of a batch spread
over many personas is one call per bucket touched (about 10-13 ms each), so it costs more
as buckets multiply. With 64, a batch for 20,000 different personas ingested at 0.45 of
one busy persona's rate; 32 halves those calls and keeps recall p99 far under 50 ms up to
about 2 million records. Figures in bench/RESULTS.md and docs/operations.md.

A bucket's name carries the bucket count, so a store made with another count is never
read as if it were this one. The index (`<base>_index`) lists the personas that have
memory, one small record each, so counting and listing them never reads the memories.

A store in an earlier layout (one shared collection `<base>`, or `<base>_p_<digest>` per
persona) is moved into buckets when first opened; see `migrate`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection

from ..contract.ids import digest
from ..runtime import logs

BUCKETS = 32
SPACE = {"hnsw": {"space": "cosine"}}
# Chroma's SQLite backend binds one variable per id; stay well under its limit per call.
IDS_PER_CALL = 1000


def bucket_of(persona_id: str) -> int:
    """The bucket (0 .. BUCKETS-1) that holds `persona_id`'s memories: a stable hash."""
    return int(digest("memory", persona_id, length=8), 16) % BUCKETS


def bucket_name(base: str, bucket: int) -> str:
    return f"{base}_bucket{bucket:02d}of{BUCKETS}"


def index_name(base: str) -> str:
    return f"{base}_index"


def index_vector(persona_id: str) -> list[float]:
    """The index record's embedding. Chroma needs one per record and the index is never
    searched; distinct points keep its HNSW graph ordinary (identical ones degenerate it)."""
    angle = 2 * math.pi * int(digest("index", persona_id, length=8), 16) / 16**8
    return [math.cos(angle), math.sin(angle)]


def open_bucket(client: ClientAPI, base: str, bucket: int) -> Collection:
    return client.get_or_create_collection(
        bucket_name(base, bucket), embedding_function=None, configuration=SPACE, metadata={"layout": "persona buckets"}
    )


def open_index(client: ClientAPI, base: str) -> Collection:
    return client.get_or_create_collection(index_name(base), embedding_function=None)


def index_personas(index: Collection, personas: set[str]) -> None:
    """Add `personas` to the index (already there: no change)."""
    ordered = sorted(personas)
    for start in range(0, len(ordered), IDS_PER_CALL):
        chunk = ordered[start : start + IDS_PER_CALL]
        index.upsert(
            ids=chunk,
            embeddings=[index_vector(p) for p in chunk],
            metadatas=[{"persona_id": p, "bucket": bucket_of(p)} for p in chunk],
        )


def legacy_sources(client: ClientAPI, base: str) -> list[str]:
    """The collections of earlier layouts still holding memories: the shared `<base>`, the
    per-persona `<base>_p_<24 hex digits>`, and buckets made with another bucket count.
    Matched exactly: another deployment's collections that merely share the prefix (a
    CHROMADB_COLLECTION of `<base>_p_staging`) are not this store's."""
    earlier = re.compile(rf"{re.escape(base)}(_p_[0-9a-f]{{24}}|_bucket[0-9]{{2,}}of[0-9]+)?")
    current = {bucket_name(base, b) for b in range(BUCKETS)}
    return sorted(c.name for c in client.list_collections() if earlier.fullmatch(c.name) and c.name not in current)


def migrate(client: ClientAPI, base: str) -> int:
    """Move every record of the earlier layouts into persona buckets; returns how many
    were moved.

    Each source collection is read a page at a time in the order it was written (so a
    persona's newest records stay newest), its personas are indexed, its records added
    to their buckets, and only then is it deleted. Killed at any point, the next start
    repeats the unfinished collection: adding an id a bucket already holds changes
    nothing, so nothing is lost or doubled.
    """
    sources = legacy_sources(client, base)
    if not sources:
        return 0
    moved = 0
    for n, name in enumerate(sources, 1):
        try:
            moved += _move(client, base, name)
        except Exception as exc:  # one collection that cannot move must not keep the store closed
            logs.event("memory_migration_failed", logging.WARNING, collection=name, error=logs.describe(exc))
        if n % 500 == 0:
            logs.event("memory_migrating", collections_done=n, collections=len(sources), records=moved)
    logs.event("memory_migrated", records=moved, collections=len(sources), layout=f"{BUCKETS} persona buckets")
    return moved


def _move(client: ClientAPI, base: str, name: str) -> int:
    """Move one earlier collection's records into their buckets, then drop it; returns how
    many moved. A record whose persona is unknown (no `persona_id` in it or in its
    collection's metadata) is left out and counted in the log."""
    index = open_index(client, base)
    opened: dict[int, Collection] = {}
    source = client.get_collection(name, embedding_function=None)
    owner = (source.metadata or {}).get("persona_id")
    offset = moved = orphans = 0
    while True:
        page: Any = source.get(limit=IDS_PER_CALL, offset=offset, include=["embeddings", "documents", "metadatas"])
        if not page["ids"]:
            break
        offset += len(page["ids"])
        rows: dict[int, list[int]] = {}
        for i, meta in enumerate(page["metadatas"]):
            persona = (meta or {}).get("persona_id") or owner
            if not isinstance(persona, str):
                orphans += 1
                continue
            page["metadatas"][i] = {**(meta or {}), "persona_id": persona}
            rows.setdefault(bucket_of(persona), []).append(i)
        index_personas(index, {str(page["metadatas"][i]["persona_id"]) for kept in rows.values() for i in kept})
        for b, kept in rows.items():
            if b not in opened:
                opened[b] = open_bucket(client, base, b)
            opened[b].add(
                ids=[page["ids"][i] for i in kept],
                embeddings=[page["embeddings"][i] for i in kept],
                documents=[page["documents"][i] for i in kept],
                metadatas=[page["metadatas"][i] for i in kept],
            )
            moved += len(kept)
    client.delete_collection(name)
    if orphans:
        logs.event("memory_migration_orphans", logging.WARNING, collection=name, records=orphans)
    return moved
