"""The daemon: the topic -> handler table, start-up, the main loop, shutdown.

Role `ingest` consumes the four input topics in the group KAFKA_GROUP_ID; role `trainer`
consumes `ings.train-job` in KAFKA_TRAINER_GROUP_ID, one job at a time; role `all` runs
both in one process. Each role is a `ConsumerLoop` driving a `Router` over its table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from http.server import ThreadingHTTPServer

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from . import logs
from .batching import Batcher
from .bus import Batch, ConsumerLoop, Producer, ensure_topics
from .config import Settings
from .events import Handshake, Interaction, RecallRequest, TrainJob, TuneRequest
from .metrics import TRAINING_QUEUE, Health, serve_http
from .routing import Route, Router

HEARTBEAT_S = 1.0
CHECK_EVERY_S = 5.0
CHECK_TIMEOUT_S = 10.0


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = Health()
        self.producer = Producer(settings)
        self.loops: list[ConsumerLoop] = []
        self.checks: list[Callable[[], Awaitable[None]]] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.stop_requested = asyncio.Event()
        self.http: ThreadingHTTPServer | None = None

    async def start(self) -> None:
        s = self.settings
        logs.event(
            "starting",
            role=s.ings_role,
            kafka=s.kafka_bootstrap_servers,
            chroma=f"{s.chromadb_host}:{s.chromadb_port}" if s.chromadb_host else str(s.chromadb_path),
            http_port=s.ings_http_port,
            base_model=s.ings_base_model or None,
        )
        self.http = serve_http(s.ings_http_host, s.ings_http_port, self.health)
        if s.kafka_create_topics:
            await ensure_topics(s)
        await self.producer.start()
        if s.ings_role in ("all", "ingest"):
            await self._add_ingest()
        if s.ings_role in ("all", "trainer"):
            await self._add_trainer()
        for loop in self.loops:
            await loop.start()

    async def _add_ingest(self) -> None:
        from .ingest import Ingest
        from .memory import Collections, Embedder
        from .personas import Personas

        s, topics = self.settings, self.settings.topics
        collections = Collections(s)
        embedder = await asyncio.to_thread(Embedder, s.ings_embedding_model_path, s.ings_embedding_batch_size)
        owned: set[int] = set()
        partitioner = DefaultPartitioner()

        def owns(persona_id: str) -> bool:
            # Same murmur2 partitioner as the producers that key events by persona id.
            count = len(loop.consumer.partitions_for_topic(topics.interaction) or ())
            return count > 0 and partitioner(persona_id.encode(), list(range(count)), None) in owned

        batcher = Batcher(s, collections, self.producer, owns)
        ingest = Ingest(s, collections, embedder, Personas(collections, embedder), self.producer, batcher)
        routes = {
            topics.handshake: Route(Handshake, ingest.handshakes),
            topics.interaction: Route(Interaction, ingest.interactions),
            topics.tune_request: Route(TuneRequest, ingest.tune_requests, ingest.tune_invalid),
            topics.recall_request: Route(RecallRequest, ingest.recalls),
        }

        async def on_assigned(assignment: set[TopicPartition]) -> None:
            owned.clear()
            owned.update(tp.partition for tp in assignment if tp.topic == topics.interaction)
            batcher.invalidate()

        async def process(batch: Batch) -> None:
            await router.process(batch)

        async def check() -> None:
            reachable = await collections.heartbeat()
            self.health.set_check("chroma", reachable)
            if reachable:
                await batcher.check()

        loop = ConsumerLoop(s, list(routes), s.kafka_group_id, process, on_assigned)
        router = self._router(routes, loop)
        self.loops.append(loop)
        self.checks.append(check)

    async def _add_trainer(self) -> None:
        from .memory import Collections
        from .training.role import Trainer

        s = self.settings
        trainer = Trainer(s, self.producer, Collections(s))
        routes = {s.topics.train_job: Route(TrainJob, trainer.handle)}

        async def process(batch: Batch) -> None:
            await router.process(batch)

        async def queue_depth() -> None:
            TRAINING_QUEUE.set(loop.last_lag + trainer.running)

        # One job per fetch: a job's offset is committed as soon as that job is announced.
        loop = ConsumerLoop(s, list(routes), s.kafka_trainer_group_id, process, max_records=1)
        router = self._router(routes, loop)
        self.loops.append(loop)
        self.checks.append(queue_depth)
        self.closers.append(trainer.close)

    def _router(self, routes: dict[str, Route], loop: ConsumerLoop) -> Router:
        s = self.settings
        return Router(routes, self.producer, s.topics.dlq, loop.tracker, s.ings_max_event_bytes, s.ings_retry_max_s)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, self.stop_requested.set)
        try:
            await self.start()
        except Exception as exc:
            logs.event("start_failed", logging.ERROR, exc=exc)
            await self.close()
            return 1
        tasks = [asyncio.create_task(loop.run(), name=f"consume-{loop.group_id}") for loop in self.loops]
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
            self.health.set_check("kafka_group", bool(self.loops) and all(loop.joined for loop in self.loops))
            await asyncio.sleep(HEARTBEAT_S)

    async def _periodic_checks(self) -> None:
        """Lag gauges, Chroma reachability, the batcher's max-wait; each one bounded in time."""
        checks = [loop.refresh_lag for loop in self.loops] + self.checks
        while True:
            for check in checks:
                try:
                    await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
                except Exception as exc:
                    logs.event("check_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(CHECK_EVERY_S)

    async def close(self) -> None:
        timeout = self.settings.ings_shutdown_timeout_s
        for loop in self.loops:
            with contextlib.suppress(Exception):
                await loop.stop(timeout)
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.producer.stop(), timeout)
        if self.http is not None:
            self.http.shutdown()
