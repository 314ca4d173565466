"""Ingest throughput, side by side in one run on the same machine:

1. bare embedding: all-MiniLM-L6-v2 encoding the interaction documents in-process;
2. the daemon: interactions produced to a real Tansu broker, consumed, embedded and
   written to embedded Chroma, timed from the first produce to the last record added;
3. a replay of the same events (the idempotent path: a lookup, no embedding).

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
from results import record_row

from ings_daemon.cli import event_key
from ings_daemon.contract.events import Interaction
from ings_daemon.contract.examples import example_text
from ings_daemon.dev.stack import Broker, free_port
from ings_daemon.ingest.embedder import Embedder

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


def wait_until(port: int, name: str, target: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while metric(port, name) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not reach {target} within {timeout}s")
        time.sleep(0.1)
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
        "KAFKA_TOPIC_PARTITIONS": "3",
        **overrides,
    }
    daemon = subprocess.Popen([sys.executable, "-m", "ings_daemon", "run"], env=env, cwd=tmp)
    try:
        wait_until(port, "ings_ready", 1, 120)
        yield port
    finally:
        daemon.terminate()
        daemon.wait(60)


def daemon_ingest(items: list[dict[str, Any]], precision: str, replay: bool) -> dict[str, float]:
    """One daemon on a fresh broker and Chroma: ingest rate, time split, optional replay rate."""
    n = len(items)
    overrides = {"INGS_ROLE": "ingest", "INGS_BASE_MODEL": "", "INGS_EMBEDDING_PRECISION": precision}
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker, daemon_running(broker, tmp, overrides) as port:
        started = time.perf_counter()
        asyncio.run(produce(broker.bootstrap, "ings.interaction", items))
        done = wait_until(port, "ings_memory_records_added_total", n, 600)
        wall = done - started
        batches = metric(port, "ings_consume_batch_size_count")
        found = {
            "rate": n / wall,
            "embedding": metric(port, "ings_embedding_seconds_sum") / wall,
            "chroma": metric(port, "ings_chroma_write_seconds_sum") / wall,
            "batch": metric(port, "ings_consume_batch_size_sum") / max(1.0, batches),
        }
        if replay:
            started = time.perf_counter()
            asyncio.run(produce(broker.bootstrap, "ings.interaction", items))
            done = wait_until(port, 'ings_events_processed_total{topic="ings.interaction"}', 2 * n, 600)
            found["replay"] = n / (done - started)
    return found


def main() -> None:
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    n = int(numbers[0]) if numbers else 2000
    items = events(n)
    docs = [example_text(i.input, i.output) for i in (Interaction.model_validate(e) for e in items)]

    # The bare loop a user would write: the same model in float32, batch 64, no daemon.
    embedder = Embedder(None, 64, "float32")
    asyncio.run(embedder.embed(docs[:64]))  # warm-up
    started = time.perf_counter()
    asyncio.run(embedder.embed(docs))
    bare = n / (time.perf_counter() - started)
    del embedder

    exact = daemon_ingest(items, "float32", replay=False)
    auto = daemon_ingest(items, "auto", replay=True)
    print(f"interactions: {n}, cores: {os.cpu_count()}")
    print(f"bare embedding (all-MiniLM-L6-v2 float32, batch 64): {bare:8.1f} texts/s")
    for name, run in (("float32 forced", exact), ("automatic precision", auto)):
        print(
            f"daemon ingest, {name:<20} {run['rate']:8.1f} interactions/s  ratio to bare {run['rate'] / bare:.2f}"
            f"  (embedding {run['embedding']:.0%}, chroma writes {run['chroma']:.0%} of wall time,"
            f" mean fetched batch {run['batch']:.0f})"
        )
    print(f"daemon replay of the same events (no-op):            {auto['replay']:8.1f} interactions/s")
    if "--no-record" not in sys.argv:
        record_row(
            Path(__file__),
            f"ingest N={n}",
            f"bare float32 {bare:.0f}/s; daemon float32 {exact['rate']:.0f}/s (x{exact['rate'] / bare:.2f}), "
            f"auto {auto['rate']:.0f}/s (x{auto['rate'] / bare:.2f}); replay {auto['replay']:.0f}/s",
        )


if __name__ == "__main__":
    main()
