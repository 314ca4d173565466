"""Ingest throughput against the loop a user would write instead, side by side in one run.

For long texts (25-70 words) and short ones (42 words, all alike), each step on a fresh
Tansu broker and a fresh `chroma run` server (or embedded Chroma with --embedded):

1. the bare loop: aiokafka `getmany` with its defaults, embed the batch with
   all-MiniLM-L6-v2 (float32, batch 64), one Chroma `add` to one collection, commit;
   timed from the first produce to the last add;
2. the daemon with float32 forced (what a CPU without bfloat16 runs), timed the same way;
3. the daemon at the automatic precision where the CPU has bfloat16 (else skipped);
4. for each daemon, CPU seconds per 1,000 interactions by process (daemon, Chroma
   server, broker), a replay of the same events (a lookup, no embedding), and the
   produce-to-stored latency of 600 events paced at half its rate (or --latency-rate);
5. the float32 daemon again with py-spy sampling every thread, in a run of its own: the
   profile split (model, Chroma client, decode and validation, metadata, ids, Kafka
   client, event loop, logging, metrics, ...) is printed as a table;
6. for reference, the model alone encoding the same texts in one in-process call.

    python bench/ingest_bench.py [N] [--texts long|short|both] [--embedded] [--no-profile]
        [--latency-rate R] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from results import record_row
from spy import profile_split, profiled

from ings_daemon.cli import event_key
from ings_daemon.contract.events import Interaction
from ings_daemon.contract.examples import example_text
from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.dev.stack import Broker, free_port
from ings_daemon.storage.embedder import Embedder, resolve_precision

TOPIC = "ings.interaction"
PARTITIONS = 3
PERSONAS = [f"did:nings:artificial:llm:bench:v1.0:{i:012x}" for i in range(20)]
WORDS = [
    "the",
    "team",
    "will",
    "review",
    "incident",
    "payments",
    "service",
    "rollback",
    "change",
    "owner",
    "timeline",
    "cause",
    "follow",
    "up",
    "customer",
    "report",
    "deploy",
    "latency",
    "error",
    "budget",
    "alert",
    "queue",
    "retry",
    "database",
    "index",
    "cache",
    "region",
    "failover",
    "runbook",
    "schedule",
    "handover",
    "metric",
    "dashboard",
    "trace",
    "request",
    "response",
    "window",
    "release",
    "ticket",
    "priority",
    "severity",
    "postmortem",
    "action",
    "item",
    "monitor",
    "threshold",
    "capacity",
    "traffic",
    "weekend",
    "shift",
    "escalation",
    "support",
    "account",
]


def events(n: int, texts: str = "short") -> list[dict[str, str]]:
    """`n` interactions for 20 personas: `short` ones of 42 words in all, or `long`
    ones of 25-70 words (a third question, two thirds answer; the issue's measured mix)."""
    if texts == "long":
        found = []
        for i in range(n):
            rng = random.Random(i)
            words = rng.randint(25, 70)
            asked = max(5, words // 3)
            found.append(
                {
                    "event_id": f"bench-{i}",
                    "persona_id": PERSONAS[i % len(PERSONAS)],
                    "input": " ".join(rng.choice(WORDS) for _ in range(asked)) + "?",
                    "output": " ".join(rng.choice(WORDS) for _ in range(words - asked)) + ".",
                }
            )
        return found
    return [
        {
            "event_id": f"bench-{i}",
            "persona_id": PERSONAS[i % len(PERSONAS)],
            "input": f"Question {i}: how should the team handle incident number {i} in the payments service?",
            "output": f"Answer {i}: stabilise first, roll back the last change, then write a short review "
            f"with the timeline, the cause and two follow-ups; incident {i} gets an owner today.",
        }
        for i in range(n)
    ]


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0  # not listening yet
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def produce(bootstrap: str, topic: str, items: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    for e in items:
        await producer.send(topic, json.dumps(e).encode(), key=(event_key(e) or "").encode())
    await producer.flush()
    await producer.stop()


def wait_until(port: int, name: str, target: float, timeout: float, every: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while metric(port, name) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not reach {target} within {timeout}s")
        time.sleep(every)
    return time.perf_counter()


@dataclass
class Stack:
    """A fresh broker and Chroma: the daemon's Chroma settings, a scratch folder, and the
    processes whose CPU time counts (name -> pid)."""

    broker: Broker
    chroma: dict[str, str]
    tmp: str
    pids: dict[str, int] = field(default_factory=dict)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds used so far by each process of `pids`."""
        return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in self.pids.items()}


@contextlib.contextmanager
def fresh_stack(embedded: bool) -> Iterator[Stack]:
    """A fresh broker with the topic (3 partitions, the daemon's) and a fresh Chroma."""
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        asyncio.run(create_topic(broker.bootstrap, PARTITIONS))
        assert broker.proc is not None
        if embedded:
            yield Stack(broker, {"CHROMADB_PATH": f"{tmp}/chroma"}, tmp, {"broker": broker.proc.pid})
            return
        with ChromaServer(Path(tmp) / "chroma", Path(tmp) / "chroma.log") as server:
            assert server.proc is not None
            chroma = {"CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(server.port)}
            yield Stack(broker, chroma, tmp, {"broker": broker.proc.pid, "Chroma server": server.proc.pid})


def cpu_used(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU seconds per 1,000 interactions of each process between two `cpu_seconds`."""
    return {name: 1000 * (after[name] - before[name]) / n for name in after}


def chroma_client(chroma: dict[str, str]) -> Any:
    import chromadb

    settings = chromadb.Settings(anonymized_telemetry=False)
    if "CHROMADB_PATH" in chroma:
        return chromadb.PersistentClient(path=chroma["CHROMADB_PATH"], settings=settings)
    return chromadb.HttpClient(host=chroma["CHROMADB_HOST"], port=int(chroma["CHROMADB_PORT"]), settings=settings)


@contextlib.contextmanager
def daemon_running(broker: Broker, tmp: str, overrides: dict[str, str], stack: Stack | None = None) -> Iterator[int]:
    """`ings-daemon run` as a subprocess on `broker`, ready; yields its HTTP port. Chroma is
    embedded in `tmp` unless `overrides` or `stack` say otherwise; with `stack`, its pid is
    added to the processes whose CPU counts, as `consumer`."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "INGS_HTTP_PORT": str(port),
        "INGS_LOG_LEVEL": "WARNING",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
        **(stack.chroma if stack else {"CHROMADB_PATH": f"{tmp}/chroma"}),
        **overrides,
    }
    daemon = subprocess.Popen([sys.executable, "-m", "ings_daemon", "run"], env=env, cwd=tmp)
    if stack is not None:
        stack.pids["consumer"] = daemon.pid
    try:
        wait_until(port, "ings_ready", 1, 120)
        yield port
    finally:
        daemon.terminate()
        daemon.wait(60)


# --- the bare loop -----------------------------------------------------------------------


def bare_loop(bootstrap: str, chroma: dict[str, str], n: int) -> None:
    """The consumer a user would write (run as its own process): prints `ready` once it has
    its partitions, then `done <unix time>` after the n-th record is added."""
    from aiokafka import AIOKafkaConsumer
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from ings_daemon.storage.embedder import default_embedding_model

    hf_logging.disable_progress_bar()

    async def run() -> None:
        model = SentenceTransformer(str(default_embedding_model()), device="cpu", local_files_only=True)
        memory = chroma_client(chroma).get_or_create_collection(
            "memory", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        consumer = AIOKafkaConsumer(
            TOPIC, bootstrap_servers=bootstrap, group_id="bare", auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        print("ready", flush=True)
        stored = 0
        while stored < n:
            batch = await consumer.getmany(timeout_ms=500)  # aiokafka defaults: all that is buffered
            events = [json.loads(r.value) for records in batch.values() for r in records]
            if not events:
                continue
            docs = [example_text(e["input"], e["output"]) for e in events]
            vectors = model.encode(docs, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            memory.add(
                ids=[e["event_id"] for e in events],
                embeddings=vectors,
                documents=docs,
                metadatas=[{"persona_id": e["persona_id"]} for e in events],
            )
            await consumer.commit()
            stored += len(events)
        print("done", time.time(), flush=True)
        await consumer.stop()

    asyncio.run(run())


async def create_topic(bootstrap: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, partitions, 1)])
    finally:
        await admin.close()


def bare_ingest(items: list[dict[str, Any]], embedded: bool) -> tuple[float, dict[str, float]]:
    """The bare loop on a fresh stack: its rate (interactions/s) and CPU per process."""
    with fresh_stack(embedded) as stack:
        command = [sys.executable, __file__, "--bare-loop", stack.broker.bootstrap, json.dumps(stack.chroma)]
        with subprocess.Popen([*command, str(len(items))], stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("the bare loop did not start")
            stack.pids["consumer"] = child.pid
            cpu = stack.cpu_seconds()
            started = time.time()
            asyncio.run(produce(stack.broker.bootstrap, TOPIC, items))
            line = child.stdout.readline().split()
            if len(line) != 2 or line[0] != "done":
                raise SystemExit("the bare loop did not finish")
            used = cpu_used(cpu, stack.cpu_seconds(), len(items))
            child.wait(60)
        return len(items) / (float(line[1]) - started), used


# --- the daemon --------------------------------------------------------------------------


async def produce_paced(bootstrap: str, items: list[dict[str, Any]], rate: float) -> None:
    """Produce `items` at `rate` per second, each stamped with its send time in metadata."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    started = time.perf_counter()
    for i, e in enumerate(items):
        await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        stamped = {**e, "metadata": {"sent": time.time()}}
        await producer.send(TOPIC, json.dumps(stamped).encode(), key=(event_key(e) or "").encode())
    await producer.flush()
    await producer.stop()


def stored_latencies(chroma: dict[str, str]) -> list[float]:
    """Seconds from send to store of every stamped memory (the daemon must have stopped).

    "Stored" is the record's `ingested_ts`, taken as the record is built for its Chroma
    add; the add itself is the `ings_chroma_write_seconds` figure."""
    found: list[float] = []
    for collection in chroma_client(chroma).list_collections():
        for meta in collection.get(include=["metadatas"])["metadatas"] or []:
            if "meta.sent" in meta:
                found.append(float(meta["ingested_ts"]) - float(meta["meta.sent"]))
    return found


def daemon_ingest(
    items: list[dict[str, Any]], precision: str, embedded: bool, profile: bool = False, paced: float = 0.0
) -> dict[str, Any]:
    """One daemon on a fresh stack: its ingest rate, time split and CPU per process; then a
    replay, and the latency of events produced at `paced` per second (0: half its rate).
    With `profile`, py-spy samples it instead (the rate then includes py-spy's cost) and
    `profile` is the split."""
    n = len(items)
    overrides = {"INGS_ROLE": "ingest", "INGS_BASE_MODEL": "", "INGS_EMBEDDING_PRECISION": precision}
    with fresh_stack(embedded) as stack:
        with daemon_running(stack.broker, stack.tmp, overrides, stack) as port:
            stacks = Path(stack.tmp) / "stacks.txt"
            with profiled(stack.pids, stacks) if profile else contextlib.nullcontext():
                cpu = stack.cpu_seconds()
                started = time.time()
                asyncio.run(produce(stack.broker.bootstrap, TOPIC, items))
                # Polled slowly (a scrape costs the daemon CPU), timed by the daemon's own clock.
                wait_until(port, "ings_memory_records_added_total", n, 600, every=1.0)
                used = cpu_used(cpu, stack.cpu_seconds(), n)
            wall = metric(port, "ings_memory_last_added_timestamp_seconds") - started
            batches = metric(port, "ings_consume_batch_size_count")
            found: dict[str, Any] = {
                "rate": n / wall,
                "cores": used["consumer"] * n / 1000 / wall,
                "cpu": used,
                "embedding": metric(port, "ings_embedding_seconds_sum") / wall,
                "chroma": metric(port, "ings_chroma_write_seconds_sum") / wall,
                "batch": metric(port, "ings_consume_batch_size_sum") / max(1.0, batches),
            }
            if profile:
                found["profile"] = profile_split(stacks)
                return found
            replayed = time.perf_counter()
            asyncio.run(produce(stack.broker.bootstrap, TOPIC, items))
            done = wait_until(port, f'ings_events_processed_total{{topic="{TOPIC}"}}', 2 * n, 600)
            found["replay"] = n / (done - replayed)
            latency_n = min(n, 600)
            later = [{**e, "event_id": f"paced-{i}"} for i, e in enumerate(items[:latency_n])]
            found["paced_rate"] = paced or found["rate"] / 2
            asyncio.run(produce_paced(stack.broker.bootstrap, later, found["paced_rate"]))
            wait_until(port, "ings_memory_records_added_total", n + latency_n, 600)
        latencies = sorted(stored_latencies(stack.chroma))
        found["p50_ms"] = 1000 * latencies[len(latencies) // 2]
        found["p99_ms"] = 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return found


def model_alone(docs: list[str]) -> float:
    """The model encoding `docs` in this process, float32, batch 64: texts per second."""
    embedder = Embedder(None, 64, "float32")
    asyncio.run(embedder.embed(docs[:64]))  # warm-up
    started = time.perf_counter()
    asyncio.run(embedder.embed(docs))
    return len(docs) / (time.perf_counter() - started)


def compare(n: int, texts: str, embedded: bool, profile: bool, paced: float) -> str:
    """Every step for one kind of text; prints the table and returns the RESULTS.md row."""
    items = events(n, texts)
    docs = [example_text(i.input, i.output) for i in (Interaction.model_validate(e) for e in items)]
    words = sum(len(d.split()) for d in docs) / len(docs)
    bare, bare_cpu = bare_ingest(items, embedded)
    exact = daemon_ingest(items, "float32", embedded, paced=paced)
    bf16 = resolve_precision("auto") == "bfloat16"
    auto = daemon_ingest(items, "auto", embedded, paced=paced) if bf16 else None
    sampled = daemon_ingest(items, "float32", embedded, profile=True) if profile else None
    alone = model_alone(docs)
    store = "embedded Chroma" if embedded else "a chroma run server"
    print(f"\n{texts} texts: {n} interactions of {words:.0f} words on average, {os.cpu_count()} cores, {store}")
    print(f"  model alone (float32, batch 64, one in-process encode call): {alone:8.1f} texts/s")
    print(f"  bare loop (getmany, embed float32 batch 64, Chroma add, commit): {bare:8.1f} interactions/s")
    row = f"{texts} texts ({words:.0f} words): model alone {alone:.0f}/s; bare {bare:.0f}/s"
    for name, run in (("float32 forced", exact), ("automatic (bfloat16)", auto)):
        if run is None:
            print(f"  daemon, {name}: skipped, this CPU has no bfloat16 (the automatic precision is float32)")
            continue
        print(
            f"  daemon, {name:<21} {run['rate']:8.1f} interactions/s  ratio to bare {run['rate'] / bare:.2f}"
            f"  (embedding {run['embedding']:.0%} and Chroma writes {run['chroma']:.0%} of wall time,"
            f" {run['cores']:.2f} cores busy, mean fetched batch {run['batch']:.0f})"
        )
        print(
            f"    produce-to-stored at {run['paced_rate']:.0f}/s{'' if paced else ' (half its rate)'}:"
            f" p50 {run['p50_ms']:.0f} ms,"
            f" p99 {run['p99_ms']:.0f} ms; replay (no-op) {run['replay']:.0f}/s"
        )
        row += (
            f"; daemon {name} {run['rate']:.0f}/s (x{run['rate'] / bare:.2f}), at {run['paced_rate']:.0f}/s"
            f" p50 {run['p50_ms']:.0f} ms p99 {run['p99_ms']:.0f} ms, replay {run['replay']:.0f}/s"
        )
    print("  CPU seconds per 1,000 interactions, by process (ingest only):")
    runs = {"bare loop": bare_cpu, "daemon float32": exact["cpu"], **({"daemon auto": auto["cpu"]} if auto else {})}
    print("    " + f"{'':<16}" + "".join(f"{name:>16}" for name in runs))
    for process in bare_cpu:
        print("    " + f"{process:<16}" + "".join(f"{cpu[process]:16.1f}" for cpu in runs.values()))
    if sampled is not None:
        print(
            f"  where the float32 daemon's busy time went (py-spy on all its threads, 100 samples/s; a run of"
            f" its own, {sampled['rate']:.1f}/s with py-spy taking {sampled['cpu']['py-spy']:.1f} CPU s per 1,000):"
        )
        for part, share in sampled["profile"].items():
            print(f"    {part:<42} {share:6.1%}")
        top = ", ".join(f"{p.split(' (')[0]} {s:.1%}" for p, s in list(sampled["profile"].items())[:4])
        row += f"; profile: {top}"
    return row


def main() -> None:
    if sys.argv[1:2] == ["--bare-loop"]:
        bare_loop(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=3000)
    parser.add_argument("--texts", choices=["long", "short", "both"], default="both")
    parser.add_argument("--embedded", action="store_true", help="embedded Chroma instead of a chroma run server")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--latency-rate", type=float, default=0.0, help="produce rate for latency (default: half)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for texts in ["long", "short"] if args.texts == "both" else [args.texts]:
        row = compare(args.n, texts, args.embedded, not args.no_profile, args.latency_rate)
        if not args.no_record:
            record_row(Path(__file__), f"ingest N={args.n} ({'embedded' if args.embedded else 'chroma run'})", row)


if __name__ == "__main__":
    main()
