"""The daemon: start-up, the consumer loops of its roles, the periodic checks, shutdown.

Role `ingest` consumes the four input topics in the group KAFKA_GROUP_ID; role `trainer`
consumes `ings.train-job` in KAFKA_TRAINER_GROUP_ID, one job at a time; role `serving`
follows `ings.adapter-ready` and `ings.adapter-retired` in KAFKA_SERVING_GROUP_ID and keeps
the vLLM servers in step; role `all` runs ingest and trainer, and serving when it is
configured (INGS_VLLM_URLS or INGS_SERVING_RESOLVER_DIR). Each role is a route table
(`Ingest.routes()`, ...) driven by a runtime `ConsumerLoop`; the runtime does every publish,
dead letter and commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import UserError
from .runtime import heap, logs
from .runtime.consumer import ConsumerLoop
from .runtime.http import Health, HttpServer, probe_routes
from .runtime.kafka import Ownership, Producer, Publish, ensure_topics
from .runtime.metrics import TRAINING_QUEUE

HEARTBEAT_S = 1.0
CHECK_EVERY_S = 5.0
CHECK_TIMEOUT_S = 10.0


def writable_folder(path: Path, setting: str) -> None:
    """Create `path` if needed and check this process can write there.

    Raises UserError naming `setting` and the uid otherwise: a volume or bind mount owned by
    another user would fail later, deep inside a run, with a traceback.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        advice = (
            "mount a writable volume there"
            if exc.errno == errno.EROFS
            else "give this user the folder (the image runs as 10001: chown -R 10001:10001 on the host)"
        )
        raise UserError(
            f"{setting}={path} is not writable by uid {os.getuid()}: {exc.strerror or exc}; {advice}"
        ) from None


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = Health()
        self.producer = Producer(settings)
        self.loops: list[ConsumerLoop] = []
        self.checks: list[Callable[[], Awaitable[None]]] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []
        # Background tasks of a role that run for the daemon's life (the serving reconcile).
        self.workers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.stop_requested = asyncio.Event()
        self.http: HttpServer | None = None
        self.ingress: Any = None  # the HTTP commands (ingress.Ingress), imported when serving HTTP

    async def start(self) -> None:
        s = self.settings
        logs.event(
            "starting",
            role=s.ings_role,
            kafka=s.kafka_bootstrap_servers,
            chroma=f"{s.chromadb_host}:{s.chromadb_port}" if s.chromadb_host else str(s.chromadb_path),
            http_port=s.ings_http_port,
            base_model=s.ings_base_model or None,
            http_ingress=s.ings_http_ingress,
            redact_pii=s.ings_redact_pii,
            retention_days=s.ings_memory_retention_days or None,
            http_token=s.ings_http_token is not None,
        )
        writable_folder(s.ings_adapter_dir, "INGS_ADAPTER_DIR")
        if not s.chromadb_host:
            writable_folder(s.chromadb_path, "CHROMADB_PATH")
        await self._serve_http()
        if s.kafka_create_topics:
            await ensure_topics(s)
        await self.producer.start()
        if s.ings_role in ("all", "ingest"):
            await self._add_ingest()
        if s.ings_role in ("all", "trainer"):
            self._add_trainer()
        if s.ings_role == "serving" or (s.ings_role == "all" and s.serving):
            self._add_serving()
        for loop in self.loops:
            await loop.start()

    async def _serve_http(self) -> None:
        from .ingress import Ingress

        s = self.settings
        ingress = self.ingress = Ingress(s, self.health)
        self.http = HttpServer(
            s.ings_http_host,
            s.ings_http_port,
            probe_routes(self.health) + ingress.routes(),
            max_body_bytes=s.ings_max_event_bytes,
            on_cleanup=[ingress.close],
        )
        try:
            await asyncio.to_thread(self.http.start)
        except OSError as exc:
            where = f"{s.ings_http_host}:{s.ings_http_port}"
            raise UserError(
                f"cannot listen on {where} (INGS_HTTP_HOST, INGS_HTTP_PORT): {exc.strerror or exc};"
                " stop what holds the port or set INGS_HTTP_PORT to a free one"
            ) from None

    async def _add_ingest(self) -> None:
        from .ingest.handlers import Ingest
        from .storage.chroma import Collections
        from .storage.embedder import Embedder

        s = self.settings
        collections = Collections(s)
        # Asked now, so an unreachable server is named in the log and /readyz from the start
        # (a passing answer waits for the periodic check: alone it would make /readyz 200).
        if (problem := await collections.problem_at_start(CHECK_TIMEOUT_S)) is not None:
            self.health.set_check("chroma", problem)
        embedder = await asyncio.to_thread(
            Embedder, s.ings_embedding_model_path, s.ings_embedding_batch_size, s.ings_embedding_precision
        )
        logs.event("embedder_ready", precision=embedder.precision, batch_size=embedder.batch_size)
        self.ingress.chat.embedder = embedder  # the chat's recall shares the model
        ownership = Ownership(s.topics.interaction)
        ingest = Ingest(s, collections, embedder, ownership)
        loop = ConsumerLoop(s, ingest.routes(), s.kafka_group_id, self.producer, ownership)

        async def check() -> None:
            problem = await collections.problem()
            self.health.set_check("chroma", problem)
            if problem is None:
                await loop.router.perform(await ingest.batcher.check(), s.topics.interaction)
                await loop.router.perform(await ingest.forgetting.sweep(), s.topics.forget)
                await loop.router.perform(await ingest.feedback.expire(), s.topics.feedback)

        self.loops.append(loop)
        self.checks.append(check)

    def _add_trainer(self) -> None:
        from .storage.chroma import Collections
        from .trainer.handler import Trainer

        s = self.settings
        trainer = Trainer(s, Collections(s), self.notify)
        # One job per fetch: a job's offset is committed as soon as that job is announced.
        loop = ConsumerLoop(s, trainer.routes(), s.kafka_trainer_group_id, self.producer, max_records=1)

        async def queue_depth() -> None:
            TRAINING_QUEUE.set(loop.last_lag + trainer.running)

        self.loops.append(loop)
        self.checks.append(queue_depth)
        self.closers.append(trainer.close)

    def _add_serving(self) -> None:
        from .serving.sync import ServingSync

        s = self.settings
        writable_folder(s.ings_adapter_dir, "INGS_ADAPTER_DIR")
        sync = ServingSync(s, self.health, self.notify)
        self.loops.append(ConsumerLoop(s, sync.routes(), s.kafka_serving_group_id, self.producer))
        self.workers.append(sync.run)
        self.closers.append(sync.close)

    async def notify(self, item: Publish) -> None:
        """Publish a progress event now, best effort: a lost one is followed by the next."""
        try:
            await self.producer.publish([item])
        except Exception as exc:
            logs.event("notify_failed", logging.WARNING, topic=item.topic, error=logs.describe(exc))

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, self.stop_requested.set)
        try:
            await self.start()
        except Exception as exc:
            if isinstance(exc, UserError):  # it says what to do; a traceback would bury that
                logs.event("start_failed", logging.ERROR, error=str(exc))
            else:
                logs.event("start_failed", logging.ERROR, exc=exc)
            await self.close()
            return 1
        tasks = [asyncio.create_task(loop.run(), name=f"consume-{loop.group_id}") for loop in self.loops]
        tasks += [asyncio.create_task(worker(), name="worker") for worker in self.workers]
        tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        tasks.append(asyncio.create_task(self._periodic_checks(), name="checks"))
        stopper = asyncio.create_task(self.stop_requested.wait())
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is not stopper and task.exception() is not None:
                logs.event("task_failed", logging.ERROR, task=task.get_name(), exc=task.exception())
                code = 1
        logs.event("stopping", reason="signal" if stopper in done else "task ended")
        await self.close()
        for task in [*tasks, stopper]:
            task.cancel()
        logs.event("stopped", exit_code=code)
        return code

    async def _heartbeat(self) -> None:
        # Alone in its task, so /healthz reports the loop itself, never a slow check.
        while True:
            self.health.beat()
            joined = bool(self.loops) and all(loop.joined for loop in self.loops)
            self.health.set_check("kafka_group", None if joined else "consumer group not joined yet")
            stalls = [r for r in (loop.stall(self.settings.ings_stall_s) for loop in self.loops) if r]
            self.health.set_check("consumer", "; ".join(stalls) or None)
            await asyncio.sleep(HEARTBEAT_S)

    async def _periodic_checks(self) -> None:
        """Lag gauges, Chroma reachability, the batcher's max-wait; each one bounded in time."""
        checks = [loop.refresh_lag for loop in self.loops] + self.checks + [self._trim_heap]
        while True:
            for check in checks:
                try:
                    await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
                except Exception as exc:
                    logs.event("check_failed", logging.WARNING, error=logs.describe(exc))
            await asyncio.sleep(CHECK_EVERY_S)

    async def _trim_heap(self) -> None:
        heap.trim()

    async def close(self) -> None:
        timeout = self.settings.ings_shutdown_timeout_s
        # Closers first: the trainer's stops a training run rather than letting the loop wait
        # up to the timeout for it (the job stays uncommitted and runs after the restart).
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        for loop in self.loops:
            with contextlib.suppress(Exception):
                await loop.stop(timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.producer.stop(), timeout)
        if self.http is not None:
            await asyncio.to_thread(self.http.stop)
