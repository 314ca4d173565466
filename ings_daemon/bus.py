"""Kafka in and out: topic creation, the shared producer, the consumer loop with safe
commits, pause-while-busy, and the dead-letter topic.

The consumer loop fetches a batch, hands it to the app, and commits per partition only
the prefix of offsets whose effect is durable. While a batch takes longer than a second
(a retry, a training run) its partitions are paused and the loop keeps polling, so the
member stays in the group and newly fetched records wait in Kafka, not in memory.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from . import logs, metrics
from .config import Settings
from .events import DeadLetter


class Record(Protocol):
    """The fields of aiokafka's ConsumerRecord this daemon reads (aiokafka is untyped)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


Batch = dict[TopicPartition, list[Record]]
TOPIC_EXISTS = 36
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


async def ensure_topics(settings: Settings, deadline_s: float = 60.0) -> None:
    """Create missing topics; the persona topic is compacted (latest document per DID)."""
    topics = settings.topics
    admin = AIOKafkaAdminClient(**settings.kafka_common(), request_timeout_ms=10_000)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((KafkaError, OSError)),
        wait=wait_exponential_jitter(initial=0.2, max=3),
        stop=stop_after_delay(deadline_s),
        reraise=True,
    ):
        with attempt:
            await admin.start()
    try:
        new = [
            NewTopic(
                name,
                settings.kafka_topic_partitions,
                settings.kafka_topic_replication,
                topic_configs={"cleanup.policy": "compact"} if name == topics.persona else None,
            )
            for name in topics.all()
        ]
        response = await admin.create_topics(new)
        for name, code, message in response.topic_errors:
            if code not in (0, TOPIC_EXISTS):
                raise RuntimeError(f"could not create topic {name}: error {code} {message}")
    finally:
        await admin.close()


class Producer:
    """The one producer of a process. Every event is keyed by persona id, so all of a
    persona's events land on one partition in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Idempotence stays off: Tansu's InitProducerId is broken, and every effect here
        # is idempotent by event id anyway.
        self.producer = AIOKafkaProducer(
            **settings.kafka_common(),
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            max_request_size=MAX_MESSAGE_BYTES,
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.flush()
        await self.producer.stop()

    async def publish(self, topic: str, key: str | None, event: BaseModel | bytes) -> None:
        await self.publish_many([(topic, key, event)])

    async def publish_many(self, items: Iterable[tuple[str, str | None, BaseModel | bytes]]) -> None:
        """Send all, then wait for every acknowledgement; a failure raises for a retry."""
        pending = []
        for topic, key, event in items:
            value = event if isinstance(event, bytes) else event.model_dump_json().encode()
            pending.append(await self.producer.send(topic, value, key=key.encode() if key else None))
        await asyncio.gather(*pending)


async def dead_letter(
    producer: Producer, dlq_topic: str, record: Record, reason: str, error_type: str
) -> None:
    value = record.value or b""
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    letter = DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        value_b64=base64.b64encode(value).decode(),
        value_text=text,
        reason=reason[:2000],
        error_type=error_type,
    )
    await producer.publish(dlq_topic, letter.key, letter)
    metrics.EVENTS_DEAD_LETTERED.labels(topic=record.topic, reason=error_type).inc()
    logs.event(
        "dead_lettered",
        logging.WARNING,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        error_type=error_type,
        reason=reason[:300],
    )


class OffsetTracker:
    """Which fetched offsets are finished; only a partition's finished prefix is committable."""

    def __init__(self) -> None:
        self.pending: dict[TopicPartition, list[int]] = {}
        self.done: set[tuple[TopicPartition, int]] = set()

    def begin(self, batch: Batch) -> None:
        for tp, records in batch.items():
            self.pending.setdefault(tp, []).extend(r.offset for r in records)

    def finish(self, records: Iterable[Record]) -> None:
        for r in records:
            self.done.add((TopicPartition(r.topic, r.partition), r.offset))

    def take_committable(self, only: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Pop the finished prefix of each partition; returns next offsets to commit."""
        commits: dict[TopicPartition, int] = {}
        for tp in list(self.pending if only is None else only):
            offsets = self.pending.get(tp, [])
            n = 0
            while n < len(offsets) and (tp, offsets[n]) in self.done:
                self.done.discard((tp, offsets[n]))
                n += 1
            if n:
                commits[tp] = offsets[n - 1] + 1
                del offsets[:n]
        return commits

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.pending.pop(tp, None)
        self.done = {d for d in self.done if d[0] in self.pending}


class ConsumerLoop(ConsumerRebalanceListener):  # type: ignore[misc]
    """One consumer group member over some topics, driving `process(batch)` in a loop."""

    def __init__(
        self,
        settings: Settings,
        topics: list[str],
        group_id: str,
        process: Callable[[Batch], Coroutine[Any, Any, None]],
        on_assigned: Callable[[set[TopicPartition]], Awaitable[None]] | None = None,
        max_records: int | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.process = process
        self.on_assigned = on_assigned
        self.max_records = max_records or settings.kafka_max_poll_records
        self.tracker = OffsetTracker()
        self.inflight: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.joined = False
        self.group_id = group_id
        self.last_lag = 0
        instance = settings.kafka_group_instance_id
        self.consumer = AIOKafkaConsumer(
            **settings.kafka_common(),
            group_id=group_id,
            group_instance_id=f"{instance}-{group_id}" if instance else None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_records,
            fetch_max_bytes=MAX_MESSAGE_BYTES * 2,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        )

    # --- rebalance listener ---------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Give the batch in hand a bounded chance to finish, then commit what is finished:
        # the next owner resumes exactly after it.
        if self.inflight is not None and not self.inflight.done():
            await asyncio.wait({self.inflight}, timeout=10.0)
        await self._commit(self.tracker.take_committable(revoked))
        self.tracker.forget(revoked)
        logs.event("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.joined = True
        if self.inflight is not None and not self.inflight.done():
            self.consumer.pause(*assigned)
        logs.event("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        if self.on_assigned is not None:
            await self.on_assigned(set(self.consumer.assignment()))

    # --- the loop -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=self)

    async def run(self) -> None:
        while not self.stopping.is_set():
            batch: Batch = await self.consumer.getmany(timeout_ms=500, max_records=self.max_records)
            if not batch:
                continue
            self._observe(batch)
            self.tracker.begin(batch)
            self.inflight = asyncio.create_task(self.process(batch))
            await self._wait_polling(self.inflight)
            await self._commit(self.tracker.take_committable())

    async def _wait_polling(self, task: asyncio.Task[None]) -> None:
        """Wait for the batch; if it is slow, pause and keep polling to stay in the group."""
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            task.result()
            return
        paused = set(self.consumer.assignment())
        self.consumer.pause(*paused)
        metrics.CONSUMER_PAUSED.set(1)
        try:
            while not task.done():
                stray: Batch = await self.consumer.getmany(timeout_ms=1000)
                # A partition assigned mid-batch may deliver before it is paused: rewind it.
                for tp, records in stray.items():
                    self.consumer.seek(tp, records[0].offset)
                    self.consumer.pause(tp)
                    paused.add(tp)
        finally:
            self.consumer.resume(*(paused & set(self.consumer.assignment())))
            metrics.CONSUMER_PAUSED.set(0)
        task.result()

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching, let the batch in hand finish (bounded), commit, leave the group."""
        self.stopping.set()
        if self.inflight is not None and not self.inflight.done():
            _, pending = await asyncio.wait({self.inflight}, timeout=timeout_s)
            for task in pending:
                task.cancel()
        await self._commit(self.tracker.take_committable())
        try:
            await self.consumer.stop()
        except asyncio.CancelledError:
            # aiokafka's fetcher re-raises the cancellation of its own fetch task when the
            # broker is already gone; only a cancellation of this task itself propagates.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        owned = {tp: o for tp, o in offsets.items() if tp in self.consumer.assignment()}
        if not owned:
            return
        try:
            await self.consumer.commit(owned)
        except (CommitFailedError, IllegalStateError) as exc:
            # Lost the partitions to a rebalance: their next owner re-processes from the
            # last commit, and every effect is idempotent.
            logs.event("commit_skipped", logging.WARNING, reason=str(exc))

    def _observe(self, batch: Batch) -> None:
        for tp, records in batch.items():
            metrics.EVENTS_CONSUMED.labels(topic=tp.topic).inc(len(records))
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - records[-1].offset - 1)
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        metrics.CONSUME_BATCH_SIZE.observe(sum(len(r) for r in batch.values()))

    async def refresh_lag(self) -> int:
        """Set the lag gauge of every owned partition; returns the total.

        Lag is highwater minus position: Tansu's end_offsets() is wrong, highwater is not.
        """
        total = 0
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self.consumer.position(tp)
            except (KafkaError, IllegalStateError):
                continue  # revoked meanwhile
            lag = max(0, highwater - position)
            total += lag
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        self.last_lag = total
        return total
