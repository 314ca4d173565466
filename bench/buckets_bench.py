"""How many persona buckets: the same memories in B bucket collections, for several B side
by side, each on a fresh `chroma run` server.

P personas x M memories (random unit vectors of 384 dimensions, a persona's records all
in bucket hash(persona) mod B, tagged with `persona_id`) are added through Chroma's
client, then top-5 queries filtered by `persona_id` run for random personas one at a
time. Prints per B the server's RSS, the recall p50/p99 and the write rate, and the
ratios to the daemon's count (`ings_daemon.storage.buckets.BUCKETS`); appends a row.

    python bench/buckets_bench.py [--counts 16,64,256] [--personas P] [--memories M]
                                  [--queries Q] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np
import psutil
from results import record_row

from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.storage.buckets import BUCKETS, SPACE

DIM = 384
K = 5
WRITE = 1000


def measure(buckets: int, personas: int, memories: int, queries: int) -> tuple[float, float, float, float]:
    """(server RSS MiB, recall p50 ms, p99 ms, records written per second) for one count."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, ChromaServer(Path(tmp) / "c", Path(tmp) / "c.log") as server:
        client = chromadb.HttpClient(port=server.port, settings=chromadb.Settings(anonymized_telemetry=False))
        cols = [
            client.get_or_create_collection(f"bucket{b:03d}", embedding_function=None, configuration=SPACE)
            for b in range(buckets)
        ]
        members: dict[int, list[int]] = {}
        for p in range(personas):
            members.setdefault(p % buckets, []).append(p)
        started = time.perf_counter()
        per_call = max(1, WRITE // memories)
        for b, owners in members.items():
            for start in range(0, len(owners), per_call):
                rows = [(p, m) for p in owners[start : start + per_call] for m in range(memories)]
                vectors = rng.standard_normal((len(rows), DIM)).astype(np.float32)
                cols[b].add(
                    ids=[f"{p}-{m}" for p, m in rows],
                    embeddings=(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist(),
                    metadatas=[{"persona_id": f"p{p}", "job_id": ""} for p, _ in rows],
                    documents=[f"input: question {m}\noutput: answer {m}" for _, m in rows],
                )
        rate = personas * memories / (time.perf_counter() - started)
        times = []
        for n in range(queries + 20):  # the first 20 warm the indexes
            p = random.randrange(personas)
            q = rng.standard_normal(DIM).astype(np.float32)
            began = time.perf_counter()
            found = cols[p % buckets].query(
                query_embeddings=[(q / np.linalg.norm(q)).tolist()], n_results=K, where={"persona_id": f"p{p}"}
            )
            if n >= 20:
                times.append((time.perf_counter() - began) * 1000)
            assert len(found["ids"][0]) == min(K, memories)
        assert server.proc is not None
        rss = psutil.Process(server.proc.pid).memory_info().rss / 2**20
    times.sort()
    return rss, times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))], rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default=f"16,{BUCKETS},256", help="bucket counts to compare")
    parser.add_argument("--personas", type=int, default=20_000)
    parser.add_argument("--memories", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    counts = sorted({int(c) for c in args.counts.split(",")} | {BUCKETS})
    found = {b: measure(b, args.personas, args.memories, args.queries) for b in counts}
    base = found[BUCKETS]
    print(f"{args.personas:,} personas x {args.memories} memories, {args.queries} recalls per count, top-{K}")
    for b, (rss, p50, p99, rate) in found.items():
        print(
            f"{b:>4} buckets: server RSS {rss:,.0f} MiB (ratio to {BUCKETS}: {rss / base[0]:.2f}), recall p50 "
            f"{p50:.1f} ms p99 {p99:.1f} ms (p99 ratio {p99 / base[2]:.2f}), {rate:,.0f} records/s written"
        )
    if not args.no_record:
        record_row(
            Path(__file__),
            f"buckets_bench {args.personas:,} personas x {args.memories} (chroma run)",
            "; ".join(f"{b} buckets: {r:,.0f} MiB, p50 {a:.1f} / p99 {c:.1f} ms" for b, (r, a, c, _) in found.items()),
        )


if __name__ == "__main__":
    main()
