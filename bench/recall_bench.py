"""Recall latency at scale, three memory layouts side by side in one run:

1. shared: one collection for every persona, each query filtered by `persona_id` (the
   first layout);
2. per persona: one collection per persona, each query unfiltered (the second);
3. buckets: the daemon's persona buckets, each query filtered by `persona_id` inside its persona's
   bucket (the daemon's layout, `ings_daemon.storage.buckets`; its memory cost on a server
   is measured by `bench/personas_bench.py`).

Both hold the same N memories (random unit vectors of MiniLM's 384 dimensions; the query
cost does not depend on where the vectors came from) spread over P personas, in embedded
Chroma. Prints p50/p99 of top-k queries for random personas and the ratio, and appends a
row to bench/RESULTS.md.

    python bench/recall_bench.py [N] [P] [--queries Q] [--no-record]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np
from results import record_row

from ings_daemon.storage.buckets import BUCKETS, bucket_of

DIM = 384
K = 5
ADD_BATCH = 2000


def personas(p: int) -> list[str]:
    return [f"did:nings:artificial:llm:bench:v1.0:{i:012x}" for i in range(p)]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    unit_rows: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit_rows


def fill_shared(
    client: chromadb.ClientAPI, owners: list[str], vectors: np.ndarray, name: str = "shared"
) -> chromadb.Collection:
    col = client.create_collection(name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}})
    for start in range(0, len(owners), ADD_BATCH):
        end = start + ADD_BATCH
        col.add(
            ids=[f"m{i}" for i in range(start, min(end, len(owners)))],
            embeddings=vectors[start:end].tolist(),
            metadatas=[{"persona_id": o} for o in owners[start:end]],
            documents=["x"] * len(owners[start:end]),
        )
    return col


def fill_buckets(client: chromadb.ClientAPI, owners: list[str], vectors: np.ndarray) -> list[chromadb.Collection]:
    rows: dict[int, list[int]] = {}
    for i, owner in enumerate(owners):
        rows.setdefault(bucket_of(owner), []).append(i)
    return [
        fill_shared(client, [owners[i] for i in rows.get(b, [])], vectors[rows.get(b, [])], f"bucket{b:02d}")
        for b in range(BUCKETS)
    ]


def fill_per_persona(
    client: chromadb.ClientAPI, names: list[str], owners: list[str], vectors: np.ndarray
) -> dict[str, chromadb.Collection]:
    cols = {}
    rows_of: dict[str, list[int]] = {}
    for i, owner in enumerate(owners):
        rows_of.setdefault(owner, []).append(i)
    for n, persona in enumerate(names):
        rows = rows_of.get(persona, [])
        col = client.create_collection(
            f"persona{n:05d}", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        if rows:
            col.add(
                ids=[f"m{i}" for i in rows],
                embeddings=vectors[rows].tolist(),
                metadatas=[{"persona_id": persona} for _ in rows],
                documents=["x"] * len(rows),
            )
        cols[persona] = col
    return cols


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="memories (default 100000)")
    parser.add_argument("p", nargs="?", type=int, default=1000, help="personas (default 1000)")
    parser.add_argument("--queries", type=int, default=500, help="queries per layout (default 500)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    names = personas(args.p)
    owners = [names[i % args.p] for i in range(args.n)]
    vectors = unit(rng, args.n)
    asked = [names[int(i)] for i in rng.integers(0, args.p, args.queries)]
    queries = unit(rng, args.queries)

    with tempfile.TemporaryDirectory() as tmp:
        client = chromadb.PersistentClient(path=tmp, settings=chromadb.Settings(anonymized_telemetry=False))
        started = time.perf_counter()
        shared = fill_shared(client, owners, vectors)
        shared_fill = time.perf_counter() - started
        started = time.perf_counter()
        separate = fill_per_persona(client, names, owners, vectors)
        separate_fill = time.perf_counter() - started
        started = time.perf_counter()
        bucketed = fill_buckets(client, owners, vectors)
        buckets_fill = time.perf_counter() - started

        def run(query_one: object) -> list[float]:
            times = []
            for persona, q in zip(asked, queries, strict=True):
                began = time.perf_counter()
                found = query_one(persona, q)  # type: ignore[operator]
                times.append(time.perf_counter() - began)
                assert len(found["ids"][0]) == min(K, args.n // args.p)
            return times

        def shared_query(persona: str, q: np.ndarray) -> object:
            return shared.query(query_embeddings=[q.tolist()], n_results=K, where={"persona_id": persona})

        def separate_query(persona: str, q: np.ndarray) -> object:
            return separate[persona].query(query_embeddings=[q.tolist()], n_results=K)

        def bucket_query(persona: str, q: np.ndarray) -> object:
            where = {"persona_id": persona}
            return bucketed[bucket_of(persona)].query(query_embeddings=[q.tolist()], n_results=K, where=where)

        run(shared_query)  # warm-up: indexes loaded
        run(separate_query)
        run(bucket_query)
        shared_p50, shared_p99 = percentiles(run(shared_query))
        separate_p50, separate_p99 = percentiles(run(separate_query))
        buckets_p50, buckets_p99 = percentiles(run(bucket_query))

    print(f"memories: {args.n}, personas: {args.p}, queries: {args.queries} per layout, top-{K}")
    for name, p50, p99, fill in (
        ("shared collection + persona filter", shared_p50, shared_p99, shared_fill),
        ("one collection per persona", separate_p50, separate_p99, separate_fill),
        (f"{BUCKETS} persona buckets + persona filter", buckets_p50, buckets_p99, buckets_fill),
    ):
        print(f"{name:<36} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  (filled in {fill:.0f} s)")
    print(f"p50 ratio shared/per-persona: {shared_p50 / separate_p50:.2f}")
    print(f"p50 ratio buckets/per-persona: {buckets_p50 / separate_p50:.2f}")
    if not args.no_record:
        record_row(
            Path(__file__),
            f"recall N={args.n} P={args.p}",
            f"shared p50 {shared_p50:.1f} ms p99 {shared_p99:.1f} ms; "
            f"per-persona p50 {separate_p50:.1f} ms p99 {separate_p99:.1f} ms; "
            f"{BUCKETS} buckets p50 {buckets_p50:.1f} ms p99 {buckets_p99:.1f} ms",
        )


if __name__ == "__main__":
    main()
