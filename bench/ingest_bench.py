"""Ingest throughput, side by side in one run on the same machine:

1. the bare loop a user would write instead of the daemon: aiokafka `getmany` with its
   defaults, embed the batch with all-MiniLM-L6-v2 (float32, batch 64), add it to one
   embedded Chroma collection, commit; a fresh Tansu broker, timed from the first
   produce to the last add;
2. the daemon, float32 forced and then the automatic precision, on a fresh broker and
   Chroma each, the same events, timed the same way;
3. a replay of the same events (the idempotent path: a lookup, no embedding);
4. produce-to-stored latency (p50, p99) of events sent at half the automatic rate;
5. for reference, the model alone encoding the same texts in-process (no broker, no store).

    python bench/ingest_bench.py [N] [--no-record]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from results import record_row

from ings_daemon.cli import event_key
from ings_daemon.contract.events import Interaction
from ings_daemon.contract.examples import example_text
from ings_daemon.dev.stack import Broker, free_port
from ings_daemon.storage.embedder import Embedder

TOPIC = "ings.interaction"
PARTITIONS = 3
PERSONAS = [f"did:nings:artificial:llm:bench:v1.0:{i:012x}" for i in range(20)]


def events(n: int) -> list[dict[str, str]]:
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


@contextlib.contextmanager
def daemon_running(broker: Broker, tmp: str, overrides: dict[str, str]) -> Iterator[int]:
    """`ings-daemon run` as a subprocess on `broker`, ready; yields its HTTP port."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "INGS_HTTP_PORT": str(port),
        "CHROMADB_PATH": f"{tmp}/chroma",
        "INGS_LOG_LEVEL": "WARNING",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
        **overrides,
    }
    daemon = subprocess.Popen([sys.executable, "-m", "ings_daemon", "run"], env=env, cwd=tmp)
    try:
        wait_until(port, "ings_ready", 1, 120)
        yield port
    finally:
        daemon.terminate()
        daemon.wait(60)


def bare_loop(bootstrap: str, chroma_path: str, n: int) -> None:
    """The consumer a user would write (run as its own process): prints `ready` once it has
    its partitions, then `done <unix time>` after the n-th record is added."""
    import chromadb
    from aiokafka import AIOKafkaConsumer
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from ings_daemon.storage.embedder import default_embedding_model

    hf_logging.disable_progress_bar()

    async def run() -> None:
        model = SentenceTransformer(str(default_embedding_model()), device="cpu", local_files_only=True)
        client = chromadb.PersistentClient(path=chroma_path, settings=chromadb.Settings(anonymized_telemetry=False))
        memory = client.get_or_create_collection(
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


def bare_ingest(items: list[dict[str, Any]]) -> float:
    """The bare loop on a fresh broker (the topic with the daemon's 3 partitions): its rate."""
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        asyncio.run(create_topic(broker.bootstrap, PARTITIONS))
        command = [sys.executable, __file__, "--bare-loop", broker.bootstrap, f"{tmp}/chroma", str(len(items))]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("the bare loop did not start")
            started = time.time()
            asyncio.run(produce(broker.bootstrap, TOPIC, items))
            line = child.stdout.readline().split()
            if len(line) != 2 or line[0] != "done":
                raise SystemExit("the bare loop did not finish")
            child.wait(60)
        return len(items) / (float(line[1]) - started)


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


def stored_latencies(chroma_path: str) -> list[float]:
    """Seconds from send to store of every stamped memory (the daemon must have stopped).

    "Stored" is the record's `ingested_ts`, taken as the record is built for its Chroma
    add; the add itself is the `ings_chroma_write_seconds` figure."""
    import chromadb

    client = chromadb.PersistentClient(path=chroma_path, settings=chromadb.Settings(anonymized_telemetry=False))
    found: list[float] = []
    for collection in client.list_collections():
        for meta in collection.get(include=["metadatas"])["metadatas"] or []:
            if "meta.sent" in meta:
                found.append(float(meta["ingested_ts"]) - float(meta["meta.sent"]))
    return found


def daemon_ingest(items: list[dict[str, Any]], precision: str, replay: bool, latency_n: int = 0) -> dict[str, float]:
    """One daemon on a fresh broker and Chroma: ingest rate, time split, and optionally the
    replay rate and the produce-to-stored latency of `latency_n` events at half the rate."""
    n = len(items)
    overrides = {"INGS_ROLE": "ingest", "INGS_BASE_MODEL": "", "INGS_EMBEDDING_PRECISION": precision}
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        with daemon_running(broker, tmp, overrides) as port:
            started = time.time()
            asyncio.run(produce(broker.bootstrap, TOPIC, items))
            # Polled slowly (a scrape costs the daemon CPU), timed by the daemon's own clock.
            wait_until(port, "ings_memory_records_added_total", n, 600, every=1.0)
            wall = metric(port, "ings_memory_last_added_timestamp_seconds") - started
            batches = metric(port, "ings_consume_batch_size_count")
            found = {
                "rate": n / wall,
                "embedding": metric(port, "ings_embedding_seconds_sum") / wall,
                "chroma": metric(port, "ings_chroma_write_seconds_sum") / wall,
                "batch": metric(port, "ings_consume_batch_size_sum") / max(1.0, batches),
            }
            if replay:
                started = time.perf_counter()
                asyncio.run(produce(broker.bootstrap, TOPIC, items))
                done = wait_until(port, f'ings_events_processed_total{{topic="{TOPIC}"}}', 2 * n, 600)
                found["replay"] = n / (done - started)
            if latency_n:
                later = [{**e, "event_id": f"paced-{i}"} for i, e in enumerate(events(latency_n))]
                found["paced_rate"] = found["rate"] / 2
                asyncio.run(produce_paced(broker.bootstrap, later, found["paced_rate"]))
                wait_until(port, "ings_memory_records_added_total", n + latency_n, 600)
        if latency_n:
            latencies = sorted(stored_latencies(f"{tmp}/chroma"))
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


def main() -> None:
    if sys.argv[1:2] == ["--bare-loop"]:
        bare_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    n = int(numbers[0]) if numbers else 2000
    items = events(n)
    docs = [example_text(i.input, i.output) for i in (Interaction.model_validate(e) for e in items)]

    bare = bare_ingest(items)
    exact = daemon_ingest(items, "float32", replay=False)
    auto = daemon_ingest(items, "auto", replay=True, latency_n=min(n, 1000))
    alone = model_alone(docs)
    print(f"interactions: {n}, cores: {os.cpu_count()}")
    print(f"bare loop (getmany, embed float32 batch 64, Chroma add, commit): {bare:8.1f} interactions/s")
    for name, run in (("float32 forced", exact), ("automatic precision", auto)):
        print(
            f"daemon ingest, {name:<20} {run['rate']:8.1f} interactions/s  ratio to bare {run['rate'] / bare:.2f}"
            f"  (embedding {run['embedding']:.0%}, chroma writes {run['chroma']:.0%} of wall time,"
            f" mean fetched batch {run['batch']:.0f})"
        )
    print(f"daemon replay of the same events (no-op):            {auto['replay']:8.1f} interactions/s")
    print(
        f"produce-to-stored latency at {auto['paced_rate']:.0f}/s (half the automatic rate):"
        f" p50 {auto['p50_ms']:.0f} ms, p99 {auto['p99_ms']:.0f} ms"
    )
    print(f"for reference, the model alone (float32, batch 64, in-process): {alone:8.1f} texts/s")
    if "--no-record" not in sys.argv:
        record_row(
            Path(__file__),
            f"ingest N={n}",
            f"bare loop {bare:.0f}/s; daemon float32 {exact['rate']:.0f}/s (x{exact['rate'] / bare:.2f}), "
            f"auto {auto['rate']:.0f}/s (x{auto['rate'] / bare:.2f}); replay {auto['replay']:.0f}/s; "
            f"latency at {auto['paced_rate']:.0f}/s p50 {auto['p50_ms']:.0f} ms p99 {auto['p99_ms']:.0f} ms; "
            f"model alone {alone:.0f}/s",
        )


if __name__ == "__main__":
    main()
