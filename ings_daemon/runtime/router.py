"""From fetched records to handler calls and back: decode, handle, do what the handler
returned, dead-letter, retry.

A route is a topic's event model and its handler. The handler takes a list of decoded
events (so work such as embedding is batched) and returns an `Outcome`: events to publish,
records to reject with a reason, records to leave uncommitted, and effects to run once the
events are out. The router does all of it; handlers never touch the producer.

Failures: a transient one (Chroma or the broker away) is retried with backoff for as long
as it lasts, and a stall longer than INGS_STALL_S shows on /readyz and /metrics. A
permanent one (an event too large for Kafka, a topic that is invalid or not authorised, a
bug) gets NON_TRANSIENT_ATTEMPTS tries; then the batch is split in halves until the poison
record is alone, and that record goes to the DLQ while the rest are processed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedCodecError,
    UnsupportedVersionError,
)
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from . import logs, metrics
from .deadletters import letter_for
from .decode import Incoming, Invalid, M, decode, json_object
from .kafka import Batch, EventTooLarge, Producer, Publish, Record, Unreadable

NON_TRANSIENT_ATTEMPTS = 3
T = TypeVar("T")
PERMANENT_KAFKA_ERRORS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    UnsupportedVersionError,
    UnsupportedCodecError,
    CorruptRecordException,
)


@dataclass(frozen=True)
class Reject:
    """A record to dead-letter with its reason; `answer` is sent to its producer too."""

    record: Record
    error_type: str
    reason: str
    answer: Sequence[Publish] = ()


@dataclass
class Outcome:
    """What a handler wants done; the router does it, in this order, then commits.

    `defer` leaves records uncommitted: the consumer seeks back to them, so they are
    processed again (now, or by the partition's next owner after a restart).
    `then` runs after the events are published, before the offsets are committed.
    """

    publish: list[Publish] = field(default_factory=list)
    reject: list[Reject] = field(default_factory=list)
    defer: list[Record] = field(default_factory=list)
    then: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def extend(self, other: Outcome) -> Outcome:
        self.publish += other.publish
        self.reject += other.reject
        self.defer += other.defer
        self.then += other.then
        return self


# Builds the answer to a record that was dead-lettered (a tune request answers `rejected`);
# gets the JSON object when the value was one.
InvalidHook = Callable[[Record, dict[str, Any] | None, Invalid], Sequence[Publish]]


@dataclass(frozen=True)
class Route(Generic[M]):
    """A topic's event model and its handler; `handle` must take the model's events."""

    model: type[M]
    handle: Callable[[list[Incoming[M]]], Awaitable[Outcome]]
    on_invalid: InvalidHook | None = None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying for as long as it lasts: the broker or Chroma away or slow."""
    if isinstance(exc, (EventTooLarge, Invalid, *PERMANENT_KAFKA_ERRORS)):
        return False
    if isinstance(exc, KafkaError | httpx.TransportError | ConnectionError | TimeoutError):
        return True
    # chromadb wraps a lost server in plain exceptions whose message names the connection.
    text = str(exc).lower()
    return any(word in text for word in ("connect", "timed out", "unavailable", "503", "502"))


class Router:
    """Processes one fetched batch through the route table, in the table's topic order."""

    def __init__(
        self,
        routes: dict[str, Route[Any]],
        producer: Producer,
        dlq_topic: str,
        max_event_bytes: int,
        retry_max_s: float,
    ) -> None:
        self.routes = routes
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.max_event_bytes = max_event_bytes
        self.retry_max_s = retry_max_s
        # Since when the retry loop in hand has been failing, and why: read by the stall check.
        self.failing_since: float | None = None
        self.last_error = ""

    async def process(self, batch: Batch) -> tuple[list[Record], list[Record]]:
        """Process a batch; returns (finished, deferred) records."""
        by_topic: dict[str, list[Record]] = {}
        for records in batch.values():
            for record in records:
                by_topic.setdefault(record.topic, []).append(record)
        finished: list[Record] = []
        deferred: list[Record] = []
        # Handshakes first: an interaction fetched in the same batch as its persona's
        # handshake then finds the persona registered.
        for topic, route in self.routes.items():
            if topic in by_topic:
                started = time.perf_counter()
                later = await self._process_topic(route, by_topic[topic])
                deferred += later
                left = {id(r) for r in later}
                done = [r for r in by_topic[topic] if id(r) not in left]
                finished += done
                metrics.EVENTS_PROCESSED.labels(topic=topic).inc(len(done))
                metrics.PROCESSING_SECONDS.labels(topic=topic).observe(time.perf_counter() - started)
        return finished, deferred

    async def _process_topic(self, route: Route[Any], records: list[Record]) -> list[Record]:
        good: list[Incoming[Any]] = []
        for record in records:
            if isinstance(record, Unreadable):
                await self.reject(Reject(record, "fetch_error", record.reason))
                continue
            try:
                good.append(decode(record, route.model, self.max_event_bytes))
            except Invalid as exc:
                await self.reject(Reject(record, exc.kind, str(exc), self._answer(route, record, exc)))
        return await self._handle(route, good)

    def _answer(self, route: Route[Any], record: Record, exc: Invalid) -> Sequence[Publish]:
        if route.on_invalid is None:
            return ()
        try:
            return route.on_invalid(record, json_object(record.value), exc)
        except Exception as hook_exc:
            # The record is dead-lettered all the same; only its courtesy answer is lost.
            logs.event("invalid_hook_failed", logging.ERROR, topic=record.topic, error=logs.describe(hook_exc))
            return ()

    async def _handle(self, route: Route[Any], items: list[Incoming[Any]]) -> list[Record]:
        """Run the handler, then its outcome; returns the deferred records."""
        if not items:
            return []
        topic = items[0].record.topic
        try:
            outcome: Outcome = await self.retrying(lambda: route.handle(items), topic)
            await self.perform(outcome, topic)
        except Exception as exc:
            if len(items) == 1:
                await self.reject(Reject(items[0].record, "processing_error", logs.describe(exc)))
                return []
            # Split to isolate the poison record; the rest are processed normally.
            middle = len(items) // 2
            return await self._handle(route, items[:middle]) + await self._handle(route, items[middle:])
        return outcome.defer

    async def perform(self, outcome: Outcome, topic: str) -> None:
        """Publish the events, dead-letter the rejects, then run the follow-up effects; each
        step is retried on its own, so a retry never publishes an event twice."""
        if outcome.publish:
            await self.retrying(lambda: self.producer.publish(outcome.publish), topic)
        for rejected in outcome.reject:
            await self.reject(rejected)
        for effect in outcome.then:
            await self.retrying(effect, topic)

    async def reject(self, rejected: Reject) -> None:
        """Dead-letter a record (retried until it is written), then send its answer."""
        record = rejected.record
        letter = letter_for(record, rejected.reason, rejected.error_type, self.producer.max_bytes)
        await self.retrying(
            lambda: self.producer.publish([Publish(self.dlq_topic, letter.key, letter)]), record.topic, forever=True
        )
        metrics.EVENTS_DEAD_LETTERED.labels(topic=record.topic, reason=rejected.error_type).inc()
        logs.event(
            "dead_lettered",
            logging.WARNING,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_type=rejected.error_type,
            reason=rejected.reason[:300],
        )
        if rejected.answer:
            try:
                await self.retrying(lambda: self.producer.publish(rejected.answer), record.topic)
            except Exception as exc:
                logs.event("answer_failed", logging.ERROR, topic=record.topic, error=logs.describe(exc))

    async def retrying(self, fn: Callable[[], Awaitable[T]], topic: str, *, forever: bool = False) -> T:
        """Run `fn` until it succeeds and return its result; transient errors (or all, with
        `forever`) are retried with jittered exponential backoff capped at INGS_RETRY_MAX_S,
        others NON_TRANSIENT_ATTEMPTS times, then re-raised."""

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            permanent = exc is not None and not forever and not is_transient(exc)
            return permanent and state.attempt_number >= NON_TRANSIENT_ATTEMPTS

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.last_error = f"{topic}: {logs.describe(exc)}"
            metrics.EVENTS_FAILED.labels(topic=topic).inc()
            logs.event(
                "retrying",
                logging.WARNING,
                topic=topic,
                attempt=state.attempt_number,
                error=logs.describe(exc),
                transient=exc is not None and is_transient(exc),
            )

        try:
            async for attempt in AsyncRetrying(
                stop=stop,
                wait=wait_exponential_jitter(multiplier=0.2, max=self.retry_max_s),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    result = await fn()
            return result
        finally:
            self.failing_since = None

    def stalled_for(self) -> float:
        """Seconds the current retry loop has been failing (0.0 when none is)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since
