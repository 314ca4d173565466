"""The HTTP port: /metrics, /healthz and /readyz, the health they report, and the server.

The server (aiohttp) runs in its own thread with its own event loop, so /metrics answers
even while the daemon's loop is busy; /healthz then tells whether that loop itself still
turns (its heartbeat is recent), and /readyz whether every check passes, naming the reason
of each one that does not. Other routes (the opt-in ingress) are added by the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import READY

START_TIMEOUT_S = 30.0
# A connection that sends no complete request head within this many seconds, or sits idle
# after an answer this long, is closed (aiohttp's keep-alive timer runs from the accept),
# so slow or silent clients cannot pile up.
IDLE_TIMEOUT_S = 15.0
# Open connections beyond this are closed at once: the process's file descriptors (Kafka,
# Chroma, the model files need theirs) are never exhausted by clients of this port.
MAX_CONNECTIONS = 512


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


def probe_routes(health: Health) -> list[web.RouteDef]:
    """GET /metrics (Prometheus text), /healthz and /readyz (JSON; 200 or 503)."""

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return _probe(health.alive(), {"loop_age_s": round(health.age(), 3)})

    async def readyz(_: web.Request) -> web.Response:
        checks = dict(health.checks)
        detail = {"alive": health.alive(), **{name: reason is None for name, reason in checks.items()}}
        return _probe(health.ready(), {**detail, "reasons": health.failures()})

    return [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]


def error_response(status: int, error: str, reason: str, **headers: str) -> web.Response:
    """The JSON error answer of every route: `{"error": <kind>, "reason": <what to do>}`."""
    return web.json_response({"error": error, "reason": reason}, status=status, headers=headers or None)


def _probe(ok: bool, detail: dict[str, object]) -> web.Response:
    return web.json_response({"ok": ok, **detail}, status=200 if ok else 503)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own answers (404, 405, 413, ...) as `{"error", "reason"}` like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {
            "error": exc.reason.lower().replace(" ", "_"),
            "reason": f"{exc.reason}: {request.method} {request.path[:200]}",
        }
        return web.json_response(
            body, status=exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"}
        )


class _OneLine(logging.Filter):
    """aiohttp's server log, one line per problem and without the request: a malformed
    request's error message quotes its raw header lines, Authorization included."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[1].__class__.__name__ if record.exc_info and record.exc_info[1] else "error"
        record.msg, record.args, record.exc_info, record.exc_text = f"HTTP request failed: {kind}", (), None, None
        return True


SERVER_LOG = logging.getLogger("ings.http")
SERVER_LOG.addFilter(_OneLine())


Cleanup = Callable[[web.Application], Awaitable[None]]


class HttpServer:
    """An aiohttp application served from its own thread and event loop.

    `start()` returns once the port listens and raises what binding raised (OSError for a
    port in use); `stop()` runs the routes' cleanups (`on_cleanup`) and ends the thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        routes: Iterable[web.RouteDef],
        *,
        max_body_bytes: int = 1024**2,
        on_cleanup: Iterable[Cleanup] = (),
    ) -> None:
        self.host, self.port = host, port
        # Bodies past max_body_bytes are refused with 413 before they are read whole.
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors])
        self.app.add_routes(list(routes))
        self.app.on_cleanup.extend(on_cleanup)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        listening: concurrent.futures.Future[int] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._serve, args=(listening,), name="ings-http", daemon=True)
        self.thread.start()
        self.port = listening.result(START_TIMEOUT_S)

    def _serve(self, listening: concurrent.futures.Future[int]) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's: what aiohttp and asyncio helpers find
        # Scrapes every few seconds would drown the structured log: no access log.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, keepalive_timeout=IDLE_TIMEOUT_S, logger=SERVER_LOG
        )
        try:
            loop.run_until_complete(runner.setup())
            _cap_connections(runner.server)
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            sockets = getattr(site._server, "sockets", None) or []
            listening.set_result(int(sockets[0].getsockname()[1]) if sockets else self.port)
        except BaseException as exc:
            # Closed before start() hears of it, so a stop() after a failed start finds no loop to stop.
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self.loop = None
            listening.set_exception(exc)
            return
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            # Connections still open (a client that never finished) end with the loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending))
            loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        loop = self.loop
        if loop is not None and self.thread is not None and self.thread.is_alive():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # the loop closed between the check and the call: nothing left to stop
                return
            self.thread.join(timeout_s)


def _cap_connections(server: web.Server | None) -> None:
    """Close connections past MAX_CONNECTIONS as they are accepted."""
    assert server is not None
    accept = server.connection_made

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        accept(handler, transport)
        if len(server.connections) > MAX_CONNECTIONS:
            transport.abort()

    server.connection_made = connection_made  # type: ignore[method-assign]
