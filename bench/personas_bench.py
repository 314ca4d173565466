"""Many personas on one `chroma run` server (the persona-bucket memory layout):

1. memory for P personas x M memories written through the daemon's storage layer
   (`Collections.add_memories`, random unit vectors of MiniLM's 384 dimensions so the
   model does not set the pace), and at each step of the curve (1k, 5k, 20k personas by
   default) the Chroma server's RSS and the p50/p99 of top-5 recalls
   (`Collections.query`) for random personas, one at a time on an otherwise idle machine;
2. end to end through the daemon (Tansu, `ings-daemon run`, the real embedding model, the
   same Chroma server): one interaction each for N different personas, then N for one
   busy persona; the two ingest rates side by side, and the daemon's RSS after 1k, 5k and
   all of the N personas.

Targets (issue 18): server RSS <= 2 GiB at 20,000 personas x 10; recall p99 <= 50 ms;
the different-persona rate >= half the one-persona rate; the daemon's RSS flat.

    python bench/personas_bench.py [--personas P] [--memories M] [--steps 1000,5000,20000]
                                   [--queries Q] [--interactions N] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from ingest_bench import daemon_running, produce, wait_until
from results import record_row
from soak_bench import daemon_and_worker

from ings_daemon.config import Settings
from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.dev.stack import Broker
from ings_daemon.storage.buckets import bucket_of
from ings_daemon.storage.chroma import Collections, Metadata, Record, memory_of

DIM = 384
K = 5
WRITE = 1000  # records per storage call, as a consumer batch of many personas would write
ADDED = "ings_memory_records_added_total"


def did(i: int) -> str:
    return f"did:nings:artificial:llm:bench:v1.0:{i:012x}"


def memories(rng: np.random.Generator, personas: range, per: int) -> list[Record]:
    """`per` memories each, metadata as the ingest role writes it."""
    vectors = rng.standard_normal((len(personas) * per, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for n, (p, m) in enumerate((p, m) for p in personas for m in range(per)):
        text_in, text_out = f"question {m} of persona {p}", f"answer {m} of persona {p}"
        meta: Metadata = {"persona_id": did(p), "event_id": f"e{p}-{m}", "input": text_in, "output": text_out}
        meta |= {"ingested_ts": time.time(), "job_id": "", "trained_version": 0, "source": "interaction"}
        rows.append(Record(f"m{p}-{m}", f"input: {text_in}\noutput: {text_out}", meta, vectors[n].tolist()))
    return rows


async def recall_ms(collections: Collections, asked: list[int], rng: np.random.Generator) -> list[float]:
    """Milliseconds of a top-K recall for each persona asked, one at a time, sorted."""
    times = []
    for persona in asked:
        vector = rng.standard_normal(DIM).astype(np.float32)
        started = time.perf_counter()
        found = await collections.query(memory_of(did(persona)), (vector / np.linalg.norm(vector)).tolist(), K)
        times.append((time.perf_counter() - started) * 1000)
        assert found, "a persona with memories recalled nothing"
    return sorted(times)


def settle(server: ChromaServer, deadline_s: float = 600) -> None:
    """Wait until the Chroma server is idle (under 10% of a core over a second): after a
    bulk write it goes on indexing in the background, which would be timed as the next
    phase's cost otherwise."""
    assert server.proc is not None
    chroma = psutil.Process(server.proc.pid)
    deadline = time.monotonic() + deadline_s
    while chroma.cpu_percent(interval=1.0) >= 10 and time.monotonic() < deadline:
        pass


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def fill_and_recall(server: ChromaServer, args: argparse.Namespace) -> list[tuple[int, float, float, float]]:
    """The curve: (personas, server RSS MiB, recall p50 ms, p99 ms) at each step."""
    collections = Collections(Settings(chromadb_host="127.0.0.1", chromadb_port=server.port))
    rng = np.random.default_rng(0)
    assert server.proc is not None
    chroma = psutil.Process(server.proc.pid)
    curve, done = [], 0
    per_call = max(1, WRITE // args.memories)
    for step in args.steps:
        started = time.perf_counter()
        for start in range(done, step, per_call):
            await collections.add_memories(memories(rng, range(start, min(step, start + per_call)), args.memories))
        written = (step - done) * args.memories / (time.perf_counter() - started)
        done = step
        settle(server)
        # One recall per bucket first: a bucket's first query loads its index from disk.
        await recall_ms(collections, list({bucket_of(did(p)): p for p in range(step)}.values()), rng)
        times = await recall_ms(collections, [random.randrange(step) for _ in range(args.queries)], rng)
        rss = chroma.memory_info().rss / 2**20
        curve.append((step, rss, pct(times, 0.5), pct(times, 0.99)))
        print(
            f"{step:>7} personas x{args.memories}: server RSS {rss:,.0f} MiB, recall p50 {pct(times, 0.5):.1f} ms "
            f"p99 {pct(times, 0.99):.1f} ms, written {written:,.0f} records/s",
            flush=True,
        )
    return curve


def interactions(personas: list[int], tag: str) -> list[dict[str, str]]:
    return [
        {
            "event_id": f"{tag}-{n}",
            "persona_id": did(p),
            "input": f"Question {n}: what did we decide about the rollout of service {n % 97}?",
            "output": f"Answer {n}: ship behind a flag, watch the error budget for a day, then widen it.",
        }
        for n, p in enumerate(personas)
    ]


def end_to_end(server: ChromaServer, args: argparse.Namespace) -> tuple[float, float, list[tuple[int, float]]]:
    """(rate with a different persona per record, rate for one busy persona, daemon RSS
    MiB after 1k / 5k / all of the different personas)."""
    n = args.interactions
    env = {"CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(server.port), "INGS_BASE_MODEL": ""}
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker, daemon_running(broker, tmp, env) as port:
        daemon, _ = daemon_and_worker(port)
        asyncio.run(produce(broker.bootstrap, "ings.interaction", interactions([n + 1] * 64, "warm")))
        wait_until(port, ADDED, 64, 600)
        settle(server)
        started = time.perf_counter()
        asyncio.run(produce(broker.bootstrap, "ings.interaction", interactions(list(range(n)), "spread")))
        rss = []
        for mark in sorted({min(1000, n), min(5000, n), n}):
            wait_until(port, ADDED, 64 + mark, 3600)
            rss.append((mark, daemon.memory_info().rss / 2**20))
        spread = n / (time.perf_counter() - started)
        busy_n = min(n, args.busy)
        settle(server)
        started = time.perf_counter()
        asyncio.run(produce(broker.bootstrap, "ings.interaction", interactions([0] * busy_n, "busy")))
        wait_until(port, ADDED, 64 + n + busy_n, 3600)
        busy = busy_n / (time.perf_counter() - started)
    return spread, busy, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--personas", type=int, default=20_000)
    parser.add_argument("--memories", type=int, default=10)
    parser.add_argument("--steps", default="1000,5000,20000", help="comma-separated persona counts of the curve")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--interactions", type=int, default=20_000, help="end to end, one per persona")
    parser.add_argument("--busy", type=int, default=5_000, help="end to end, all for one persona")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    args.steps = sorted({min(int(s), args.personas) for s in args.steps.split(",")} | {args.personas})
    args.interactions = min(args.interactions, args.personas)

    with tempfile.TemporaryDirectory() as tmp, ChromaServer(Path(tmp) / "chroma", Path(tmp) / "chroma.log") as server:
        curve = asyncio.run(fill_and_recall(server, args))
        spread, busy, rss = end_to_end(server, args)
    ratio = spread / busy
    print(
        f"ingest end to end: a different persona per record {spread:.1f}/s, one busy persona {busy:.1f}/s, "
        f"ratio {ratio:.2f} (target >= 0.5)"
    )
    print("daemon RSS after " + ", ".join(f"{p:,} personas {mib:,.0f} MiB" for p, mib in rss))
    last = curve[-1]
    print(
        f"at {last[0]:,} personas: server RSS {last[1]:,.0f} MiB (target <= 2048), recall p99 {last[3]:.1f} ms "
        f"(target <= 50)"
    )
    if not args.no_record:
        script = Path(__file__)
        for personas, server_rss, p50, p99 in curve:
            record_row(
                script,
                f"personas_bench {personas:,} personas x {args.memories} (chroma run)",
                f"server RSS {server_rss:,.0f} MiB; recall p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            )
        record_row(
            script,
            f"personas_bench ingest, {args.interactions:,} personas vs one",
            f"{spread:.1f} vs {busy:.1f} records/s, ratio {ratio:.2f}; daemon RSS "
            + " / ".join(f"{mib:,.0f}" for _, mib in rss)
            + " MiB at "
            + " / ".join(f"{p:,}" for p, _ in rss),
        )


if __name__ == "__main__":
    main()
