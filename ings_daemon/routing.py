"""From fetched records to handler calls: decode, validate, dead-letter, retry.

A route is a topic's event model plus its handler, which takes a list of decoded events
so work such as embedding is batched. A transient failure (Chroma or the broker away) is
retried with backoff for as long as it lasts; any other failure is retried a few times,
then the batch is split to find the poison record, which goes to the DLQ alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from . import logs, metrics
from .bus import Batch, OffsetTracker, Producer, Record, dead_letter
from .events import derived_event_id

M = TypeVar("M", bound=BaseModel)
NON_TRANSIENT_ATTEMPTS = 3


class Invalid(Exception):
    """An event that can never be processed; `kind` labels the DLQ metric."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Incoming(Generic[M]):
    record: Record
    event: M
    event_id: str
    payload: dict[str, Any]


Handler = Callable[[list[Incoming[Any]]], Awaitable[None]]
InvalidHook = Callable[[Record, dict[str, Any] | None, Invalid], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    model: type[BaseModel]
    handle: Handler
    # Called after a record of this topic is dead-lettered (a tune request answers
    # `rejected` to its sender); receives the JSON object when there was one.
    on_invalid: InvalidHook | None = None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError | httpx.TransportError | ConnectionError | TimeoutError):
        return True
    # chromadb wraps a lost server in plain exceptions whose message names the connection.
    text = str(exc).lower()
    return any(word in text for word in ("connect", "timed out", "unavailable", "503", "502"))


def decode(record: Record, model: type[BaseModel], max_bytes: int) -> Incoming[Any]:
    raw = record.value
    if raw is None:
        raise Invalid("empty", "record has no value")
    if len(raw) > max_bytes:
        raise Invalid("too_large", f"value is {len(raw)} bytes; INGS_MAX_EVENT_BYTES is {max_bytes}")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid("not_json", f"value is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise Invalid("not_object", f"value is JSON {type(payload).__name__}, expected an object")
    try:
        event = model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        kind = (
            "invalid_did"
            if any(
                err["type"] == "string_pattern_mismatch" and str(err["loc"][-1]) == "persona_id"
                for err in errors
            )
            else "invalid_event"
        )
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in errors[:10])
        raise Invalid(kind, f"{model.__name__} validation failed: {detail}") from None
    event_id = getattr(event, "event_id", None) or derived_event_id(model.__name__, payload)
    return Incoming(record=record, event=event, event_id=event_id, payload=payload)


class Router:
    """Processes one fetched batch through the route table, in the table's topic order."""

    def __init__(
        self,
        routes: dict[str, Route],
        producer: Producer,
        dlq_topic: str,
        tracker: OffsetTracker,
        max_event_bytes: int,
        retry_max_s: float,
    ) -> None:
        self.routes = routes
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.tracker = tracker
        self.max_event_bytes = max_event_bytes
        self.retry_max_s = retry_max_s

    async def process(self, batch: Batch) -> None:
        by_topic: dict[str, list[Record]] = {}
        for records in batch.values():
            for record in records:
                by_topic.setdefault(record.topic, []).append(record)
        # Handshakes first: an interaction fetched in the same batch as its persona's
        # handshake then finds the persona registered.
        for topic, route in self.routes.items():
            if topic in by_topic:
                started = time.perf_counter()
                await self._process_topic(route, by_topic[topic])
                metrics.PROCESSING_SECONDS.labels(topic=topic).observe(time.perf_counter() - started)

    async def _process_topic(self, route: Route, records: list[Record]) -> None:
        good: list[Incoming[Any]] = []
        for record in records:
            try:
                good.append(decode(record, route.model, self.max_event_bytes))
            except Invalid as exc:
                await self._reject(route, record, exc)
        await self._handle(route, good)
        self.tracker.finish(records)
        metrics.EVENTS_PROCESSED.labels(topic=records[0].topic).inc(len(records))

    async def _handle(self, route: Route, items: list[Incoming[Any]]) -> None:
        if not items:
            return
        try:
            await self.retrying(route.handle, items)
        except Exception as exc:
            if len(items) == 1:
                await self._reject(
                    route, items[0].record, Invalid("processing_error", f"{type(exc).__name__}: {exc}")
                )
                return
            # Split to isolate the poison record; the rest are processed normally.
            middle = len(items) // 2
            await self._handle(route, items[:middle])
            await self._handle(route, items[middle:])

    async def _reject(self, route: Route, record: Record, exc: Invalid) -> None:
        await self.retrying(dead_letter, self.producer, self.dlq_topic, record, str(exc), exc.kind)
        if route.on_invalid is not None:
            payload = _json_object(record.value)
            await self.retrying(route.on_invalid, record, payload, exc)

    async def retrying(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        topic = _topic_of(args)

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            return (
                exc is not None and not is_transient(exc) and state.attempt_number >= NON_TRANSIENT_ATTEMPTS
            )

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            metrics.EVENTS_FAILED.labels(topic=topic).inc()
            logs.event(
                "retrying",
                logging.WARNING,
                topic=topic,
                attempt=state.attempt_number,
                error=f"{type(exc).__name__}: {exc}"[:300],
                transient=exc is not None and is_transient(exc),
            )

        async for attempt in AsyncRetrying(
            stop=stop,
            wait=wait_exponential_jitter(initial=0.2, max=self.retry_max_s),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                await fn(*args)


def _topic_of(args: Sequence[Any]) -> str:
    for arg in args:
        if isinstance(arg, list) and arg and isinstance(arg[0], Incoming):
            return arg[0].record.topic
        if hasattr(arg, "topic") and isinstance(arg.topic, str):
            return arg.topic
    return "unknown"


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
