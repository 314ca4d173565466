"""The HTTP endpoints /metrics, /healthz and /readyz, and the health they report.

The server runs in its own thread so /metrics answers even while the event loop is busy;
/healthz then tells whether the loop itself still turns (its heartbeat is recent), and
/readyz whether every check passes, naming the reason of each one that does not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import READY


class Health:
    """What the probes report; the event loop updates it, the HTTP thread reads it.

    A check is a name and either None (passing) or the reason it fails, such as
    `"consumer ings-daemon stalled for 75 s: ConnectionError ..."`.
    """

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self.checks: dict[str, str | None] = {}

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def set_check(self, name: str, failure: str | None) -> None:
        """Record one check: None when it passes, else the reason it fails."""
        self.checks[name] = failure
        READY.set(1 if self.ready() else 0)

    def age(self) -> float:
        return time.monotonic() - self.last_beat

    def alive(self) -> bool:
        return self.age() < self.stale_after_s

    def failures(self) -> dict[str, str]:
        return {name: reason for name, reason in dict(self.checks).items() if reason is not None}

    def ready(self) -> bool:
        return self.alive() and bool(self.checks) and not self.failures()


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    def readyz() -> tuple[int, str, bytes]:
        checks = dict(health.checks)
        return _probe(
            health.ready(),
            {
                "alive": health.alive(),
                **{name: reason is None for name, reason in checks.items()},
                "reasons": health.failures(),
            },
        )

    routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest()),
        "/healthz": lambda: _probe(health.alive(), {"loop_age_s": round(health.age(), 3)}),
        "/readyz": readyz,
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
