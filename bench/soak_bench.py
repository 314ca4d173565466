"""Soak: steady interaction load with a training run every minute; does memory grow?

`ings-daemon run` (both roles, the tiny model as base) on a fresh Tansu broker and
embedded Chroma. Two personas receive a steady stream of interactions; with
`INGS_MAX_WAIT_S=60` each persona gets an auto job about once a minute, trained for real
in the worker process. Every few seconds the RSS of the daemon and of its training worker
is sampled. Growth is the median of the last minute against the median of the minute
after warm-up, for each process; the target is under 10%.

    python bench/soak_bench.py [--minutes 10] [--warmup 2] [--rate 4] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from aiokafka import AIOKafkaProducer
from ingest_bench import daemon_running, events, metric
from results import record_row

from ings_daemon.dev.stack import Broker
from ings_daemon.dev.tinymodel import make_tiny_model

PERSONAS = [f"did:nings:artificial:llm:soak:v1.0:{i:012x}" for i in range(2)]
SAMPLE_EVERY_S = 5.0


async def steady_load(bootstrap: str, rate: float, stop: threading.Event) -> int:
    """Produce interactions at `rate` per second, alternating personas, until `stop`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    sent, started = 0, time.perf_counter()
    try:
        while not stop.is_set():
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
            base = events(1)[0]
            persona = PERSONAS[sent % len(PERSONAS)]
            event = {
                **base,
                "event_id": f"soak-{sent}",
                "persona_id": persona,
                "input": f"Soak question {sent}: {base['input']}",
                "output": f"Soak answer {sent}: {base['output']}",
            }
            await producer.send("ings.interaction", json.dumps(event).encode(), key=persona.encode())
            sent += 1
    finally:
        await producer.stop()
    return sent


def daemon_and_worker(port: int) -> tuple[psutil.Process, psutil.Process | None]:
    """The daemon (listening on `port`) and its training worker child, if it runs yet."""
    daemon = next(
        psutil.Process(c.pid)
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    )
    workers = [
        p for p in daemon.children() if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in p.cmdline()
    ]
    return daemon, (workers[0] if workers else None)


def growth(samples: list[tuple[float, float]], warmup_s: float, end_s: float) -> tuple[float, float]:
    """(median RSS in the minute after warm-up, median RSS in the last minute), MiB."""
    after = [rss for t, rss in samples if warmup_s <= t < warmup_s + 60]
    last = [rss for t, rss in samples if t >= end_s - 60]
    return statistics.median(after or [float("nan")]), statistics.median(last or [float("nan")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes before the baseline is taken")
    parser.add_argument("--rate", type=float, default=4.0, help="interactions per second")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    duration, warmup = args.minutes * 60, args.warmup * 60
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        make_tiny_model(Path(tmp) / "models" / "tiny-llama")
        overrides = {
            "INGS_ROLE": "all",
            "INGS_MODELS_DIR": f"{tmp}/models",
            "INGS_ADAPTER_DIR": f"{tmp}/adapters",
            "INGS_BASE_MODEL": "tiny-llama",
            "INGS_MIN_EXAMPLES": "100000",  # jobs come from the max wait: one a minute a persona
            "INGS_MAX_WAIT_S": "60",
        }
        with daemon_running(broker, tmp, overrides) as port:
            stop = threading.Event()
            load = threading.Thread(target=lambda: asyncio.run(steady_load(broker.bootstrap, args.rate, stop)))
            load.start()
            daemon_samples: list[tuple[float, float]] = []
            worker_samples: list[tuple[float, float]] = []
            started = time.perf_counter()
            try:
                while (now := time.perf_counter() - started) < duration:
                    daemon, worker = daemon_and_worker(port)
                    daemon_samples.append((now, daemon.memory_info().rss / 2**20))
                    if worker is not None:
                        worker_samples.append((now, worker.memory_info().rss / 2**20))
                    time.sleep(SAMPLE_EVERY_S)
            finally:
                stop.set()
                load.join(30)
            stored = metric(port, "ings_memory_records_added_total")
            runs = metric(port, 'ings_training_runs_total{outcome="succeeded"}')
    results = {"daemon": growth(daemon_samples, warmup, duration), "worker": growth(worker_samples, warmup, duration)}
    print(f"{args.minutes:g} min at {args.rate:g} interactions/s, cores: {os.cpu_count()}")
    print(f"interactions stored: {stored:.0f}; training runs succeeded: {runs:.0f}")
    for name, (base, last) in results.items():
        print(f"{name:<7} RSS after warm-up {base:6.0f} MiB, last minute {last:6.0f} MiB: {last / base - 1:+.1%}")
    if not args.no_record:
        record_row(
            Path(__file__),
            f"soak {args.minutes:g} min at {args.rate:g}/s",
            f"{stored:.0f} stored, {runs:.0f} training runs; "
            + "; ".join(f"{n} {b:.0f} -> {last:.0f} MiB ({last / b - 1:+.1%})" for n, (b, last) in results.items()),
        )


if __name__ == "__main__":
    main()
