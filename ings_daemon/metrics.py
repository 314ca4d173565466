"""Prometheus metrics and the HTTP endpoints /metrics, /healthz and /readyz.

The server runs in its own thread so /metrics answers even while the event loop is busy;
/healthz then tells whether the loop itself still turns (its heartbeat is recent).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from . import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

EVENTS_CONSUMED = Counter("ings_events_consumed_total", "Records fetched from Kafka.", ["topic"])
EVENTS_PROCESSED = Counter("ings_events_processed_total", "Records whose effect is durable.", ["topic"])
EVENTS_FAILED = Counter("ings_events_failed_total", "Transient failures, retried.", ["topic"])
EVENTS_DEAD_LETTERED = Counter(
    "ings_events_dead_lettered_total", "Records sent to the dead-letter topic.", ["topic", "reason"]
)
PROCESSING_SECONDS = Histogram(
    "ings_event_processing_seconds",
    "Time to process one fetched batch of a topic.",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
EMBEDDING_SECONDS = Histogram("ings_embedding_seconds", "Time to embed one batch.", buckets=LATENCY_BUCKETS)
EMBEDDING_BATCH_SIZE = Histogram(
    "ings_embedding_batch_size", "Texts per embedding batch.", buckets=SIZE_BUCKETS
)
CHROMA_WRITE_SECONDS = Histogram(
    "ings_chroma_write_seconds", "Time of one Chroma write.", buckets=LATENCY_BUCKETS
)
CONSUME_BATCH_SIZE = Histogram("ings_consume_batch_size", "Records per fetched batch.", buckets=SIZE_BUCKETS)
CONSUMER_LAG = Gauge("ings_consumer_lag", "Highwater minus position.", ["topic", "partition"])
CONSUMER_PAUSED = Gauge("ings_consumer_paused", "1 while consumption is paused for backpressure or retry.")
MEMORY_RECORDS_ADDED = Counter("ings_memory_records_added_total", "Interaction records written to Chroma.")
PERSONAS_REGISTERED = Counter("ings_personas_registered_total", "Handshakes stored (new or updated).")
TRAIN_JOBS_PUBLISHED = Counter("ings_train_jobs_published_total", "Train jobs published.", ["trigger"])
TRAINING_RUNS = Counter("ings_training_runs_total", "Train jobs ended, by outcome.", ["outcome"])
TRAINING_SECONDS = Histogram(
    "ings_training_duration_seconds",
    "Wall time of a training run.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
TRAINING_LAST_LOSS = Gauge("ings_training_last_loss", "Last training loss reported.")
TRAINING_EXAMPLES = Counter("ings_training_examples_total", "Examples trained on.")
TRAINING_TOKENS = Counter("ings_training_tokens_total", "Tokens trained on.")
TRAINING_QUEUE = Gauge("ings_training_queue_depth", "Train jobs fetched and not yet finished.")
TRAINING_IN_PROGRESS = Gauge("ings_training_in_progress", "1 while a training run is in progress.")
READY = Gauge("ings_ready", "1 when the daemon is ready (group joined, Chroma reachable).")
BUILD_INFO = Gauge("ings_build_info", "Build information.", ["version"])
BUILD_INFO.labels(version=__version__).set(1)
# Series exist from the start, so rate() and increase() see the first event.
for _outcome in ("succeeded", "failed", "rejected", "duplicate"):
    TRAINING_RUNS.labels(outcome=_outcome)
for _trigger in ("auto", "request"):
    TRAIN_JOBS_PUBLISHED.labels(trigger=_trigger)


class Health:
    """What the probes report; the event loop updates it, the HTTP thread reads it."""

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self.checks: dict[str, bool] = {}

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def set_check(self, name: str, ok: bool) -> None:
        self.checks[name] = ok
        READY.set(1 if self.ready() else 0)

    def age(self) -> float:
        return time.monotonic() - self.last_beat

    def alive(self) -> bool:
        return self.age() < self.stale_after_s

    def ready(self) -> bool:
        return self.alive() and bool(self.checks) and all(self.checks.values())


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest()),
        "/healthz": lambda: _probe(health.alive(), {"loop_age_s": round(health.age(), 3)}),
        "/readyz": lambda: _probe(health.ready(), {"alive": health.alive(), **health.checks}),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the structured log

    return Handler


def _probe(ok: bool, detail: dict[str, object]) -> tuple[int, str, bytes]:
    body = json.dumps({"ok": ok, **detail}).encode() + b"\n"
    return (200 if ok else 503), "application/json", body


def serve_http(host: str, port: int, health: Health) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ings-http", daemon=True).start()
    return server
