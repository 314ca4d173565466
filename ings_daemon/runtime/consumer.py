"""The consumer loop: fetch, hand the batch to the router, commit the finished prefix.

One `ConsumerLoop` is one consumer group member over its routes' topics. It commits per
partition only the prefix of offsets whose effect is durable. While a batch takes longer
than 15 seconds (a retry, a training run) its partitions are paused and the loop keeps
polling, so the member stays in the group and newly fetched records wait in Kafka, not in
memory. A fetch that fails (a batch that cannot be decompressed or fails its CRC) does not
stop the loop: the readable records before it are processed, and each unreadable offset is
dead-lettered by its coordinates, then consumption continues after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from ..config import Settings
from . import logs, metrics
from .kafka import Batch, Ownership, Producer, Record, Unreadable
from .router import Route, Router, is_transient

PAUSE_AFTER_S = 1.0
# A batch still running after this long has its partitions paused. Not sooner: pausing
# drops the records aiokafka has already prefetched, and refetching them after every
# ingest batch (2-10 s) cost the ingest benchmark ~5% (bench/ingest_bench.py).
SLOW_BATCH_S = 15.0
# How long a poll while paused may wait: the finished batch waits at most this long for the
# loop to notice (at 1,000 ms the ingest benchmark lost ~13% of its time here).
PAUSED_POLL_MS = 50
DEFER_BACKOFF_S = 1.0
PROBE_TIMEOUT_MS = 500


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

    def rewind(self, tp: TopicPartition, offset: int) -> None:
        """Drop `offset` and everything after it on `tp`: they will be fetched again."""
        self.pending[tp] = [o for o in self.pending.get(tp, []) if o < offset]
        self.done = {d for d in self.done if d[0] != tp or d[1] < offset}

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.pending.pop(tp, None)
        self.done = {d for d in self.done if d[0] in self.pending}


class ConsumerLoop(ConsumerRebalanceListener):  # type: ignore[misc]
    """One consumer group member: its routes, its router, its offsets."""

    def __init__(
        self,
        settings: Settings,
        routes: dict[str, Route[Any]],
        group_id: str,
        producer: Producer,
        ownership: Ownership | None = None,
        max_records: int | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(routes)
        self.router = Router(
            routes, producer, settings.topics.dlq, settings.ings_max_event_bytes, settings.ings_retry_max_s
        )
        self.ownership = ownership
        self.max_records = max_records or settings.kafka_max_poll_records
        self.tracker = OffsetTracker()
        # Next offset to hand to the router, per partition: where to rewind after a failed fetch.
        self.expected: dict[TopicPartition, int] = {}
        self.inflight: asyncio.Task[tuple[list[Record], list[Record]]] | None = None
        self.stopping = asyncio.Event()
        self.run_task: asyncio.Task[None] | None = None
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
            fetch_max_bytes=settings.kafka_max_message_bytes * 2,
            max_partition_fetch_bytes=settings.kafka_max_message_bytes,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            # Range first: it gives one member the same partition of every input topic, so a
            # persona's handshakes, interactions and forgets (keyed alike) meet in one
            # instance (Kafka Streams' co-partitioning). Round-robin (aiokafka's default)
            # stays listed so a group can be upgraded member by member.
            partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
        )

    # --- rebalance listener ---------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Give the batch in hand a bounded chance to finish, then commit what is finished:
        # the next owner resumes exactly after it.
        if self.inflight is not None and not self.inflight.done():
            await asyncio.wait({self.inflight}, timeout=10.0)
        await self._commit(self.tracker.take_committable(revoked))
        self.tracker.forget(revoked)
        for tp in revoked:
            self.expected.pop(tp, None)
        logs.event("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.joined = True
        if self.inflight is not None and not self.inflight.done():
            self.consumer.pause(*assigned)
        logs.event("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        if self.ownership is not None:
            count = len(self.consumer.partitions_for_topic(self.ownership.topic) or ())
            self.ownership.assign(self.consumer.assignment(), count)

    # --- the loop -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=self)

    async def run(self) -> None:
        self.run_task = asyncio.current_task()
        while not self.stopping.is_set():
            try:
                batch: Batch = await self.consumer.getmany(timeout_ms=500, max_records=self.max_records)
            except Exception as exc:  # a batch that cannot be read must not end the loop
                try:
                    batch = await self._recover(exc)
                except Exception as again:  # the broker went away meanwhile: try again later
                    logs.event("fetch_recovery_failed", logging.WARNING, error=logs.describe(again))
                    await asyncio.sleep(PAUSE_AFTER_S)
                    continue
            if batch:
                await self._process(batch)

    async def _process(self, batch: Batch) -> None:
        self._observe(batch)
        self.tracker.begin(batch)
        for tp, records in batch.items():
            self.expected[tp] = records[-1].offset + 1
        self.inflight = asyncio.create_task(self.router.process(batch))
        finished, deferred = await self._wait_polling(self.inflight)
        self.tracker.finish(finished)
        await self._commit(self.tracker.take_committable())
        if deferred:
            self._rewind(deferred)
            if not self.stopping.is_set():
                await asyncio.sleep(DEFER_BACKOFF_S)

    def _rewind(self, deferred: list[Record]) -> None:
        first: dict[TopicPartition, int] = {}
        for r in deferred:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        for tp, offset in first.items():
            self.tracker.rewind(tp, offset)
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offset)
                self.expected[tp] = offset
        logs.event("deferred", partitions={f"{tp.topic}:{tp.partition}": o for tp, o in first.items()})

    async def _wait_polling(
        self, task: asyncio.Task[tuple[list[Record], list[Record]]]
    ) -> tuple[list[Record], list[Record]]:
        """Wait for the batch; if it is slow, pause and keep polling to stay in the group."""
        done, _ = await asyncio.wait({task}, timeout=SLOW_BATCH_S)
        if done:
            return task.result()
        paused = set(self.consumer.assignment())
        self.consumer.pause(*paused)
        metrics.CONSUMER_PAUSED.set(1)
        try:
            while not task.done():
                try:
                    stray: Batch = await self.consumer.getmany(timeout_ms=PAUSED_POLL_MS)
                except Exception:
                    stray = {}  # the failed fetch is recovered once the batch in hand is done
                # A partition assigned mid-batch may deliver before it is paused: rewind it.
                for tp, records in stray.items():
                    self.consumer.seek(tp, records[0].offset)
                    self.consumer.pause(tp)
                    paused.add(tp)
        finally:
            self.consumer.resume(*(paused & set(self.consumer.assignment())))
            metrics.CONSUMER_PAUSED.set(0)
        return task.result()

    # --- fetches that fail ------------------------------------------------------------------

    async def _recover(self, exc: Exception) -> Batch:
        """After a failed fetch: rewind, then find the unreadable offsets partition by partition.

        aiokafka raises a batch's decompression or CRC error out of `getmany` and drops the
        records it had already drained for other partitions in the same call, so every
        partition is first rewound to the next offset the router has not seen.
        """
        logs.event("fetch_failed", logging.WARNING, error=logs.describe(exc))
        for tp in self.consumer.assignment():
            if tp in self.expected:
                self.consumer.seek(tp, self.expected[tp])
            else:
                committed = await self.consumer.committed(tp)
                if committed is None:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
        if is_transient(exc):
            await asyncio.sleep(PAUSE_AFTER_S)
            return {}
        batch: Batch = {}
        for tp in sorted(self.consumer.assignment()):
            records = await self._scan(tp)
            if records:
                batch[tp] = records
        return batch

    async def _scan(self, tp: TopicPartition) -> list[Record]:
        """Read `tp` a record at a time up to its first unreadable offset, then mark
        unreadable offsets until a readable one (or the end); the consumer is left there."""
        found: list[Record] = []
        skipped = False
        while len(found) < self.max_records:
            try:
                got = await self.consumer.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except Exception as exc:
                if is_transient(exc):
                    break
                offset = found[-1].offset + 1 if found else await self.consumer.position(tp)
                found.append(Unreadable(tp.topic, tp.partition, offset, logs.describe(exc, 500)))
                metrics.FETCH_ERRORS.labels(topic=tp.topic).inc()
                self.consumer.seek(tp, offset + 1)
                skipped = True
                continue
            if not got:
                break
            found.extend(got.get(tp, []))
            if skipped:
                break  # past the unreadable run: the normal loop takes it from here
        return found

    # --- shutdown, commits, lag ---------------------------------------------------------------

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching, let the batch in hand finish (bounded), commit, leave the group."""
        self.stopping.set()
        if self.inflight is not None and not self.inflight.done():
            _, pending = await asyncio.wait({self.inflight}, timeout=timeout_s)
            for task in pending:
                task.cancel()
        if self.run_task is not None and not self.run_task.done():
            # Let the loop finish its own commit of the last batch before the group is left:
            # a commit still in flight after LeaveGroup fails with UnknownMemberId.
            await asyncio.wait({self.run_task}, timeout=PAUSE_AFTER_S * 2)
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
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # Lost the partitions to a rebalance, or the broker is away: the next commit
            # covers these offsets, or their next owner re-processes from the last commit,
            # and every effect is idempotent.
            logs.event("commit_skipped", logging.WARNING, reason=logs.describe(exc))

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

    def stall(self, stall_s: float) -> str | None:
        """Why this member is stalled (its batch failing longer than `stall_s`), or None."""
        seconds = self.router.stalled_for()
        metrics.CONSUMER_STALL_SECONDS.labels(group=self.group_id).set(round(seconds, 1))
        stalled = seconds > stall_s
        metrics.CONSUMER_STALLED.labels(group=self.group_id).set(1 if stalled else 0)
        if not stalled:
            return None
        return f"consumer group {self.group_id} stalled for {seconds:.0f}s retrying {self.router.last_error}"
