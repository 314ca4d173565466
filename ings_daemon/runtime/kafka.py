"""Kafka plumbing: the record shape, topic creation, the one producer of a process with
its size limit, and which personas' partitions this member owns.

Every event is checked against KAFKA_MAX_MESSAGE_BYTES (Kafka's own `message.max.bytes`,
1 MiB by default) before it is sent, and the producer is configured with the same limit,
so an event that a real Kafka would refuse fails here, loudly, whatever broker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from pydantic import BaseModel

from ..config import Settings
from ..errors import RUNTIME, UserError
from . import metrics


class Record(Protocol):
    """The fields of aiokafka's ConsumerRecord this daemon reads (aiokafka is untyped)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


Batch = dict[TopicPartition, list[Record]]
TOPIC_EXISTS = 36
# What a record costs beyond its key and value in a v2 batch of one (batch header 61 bytes,
# record header up to ~25), rounded up; headers are not used here.
RECORD_OVERHEAD_BYTES = 128
# How long a client keeps trying to reach the brokers at start before giving up with one
# line naming KAFKA_BOOTSTRAP_SERVERS: a broker that is merely starting answers sooner.
CONNECT_DEADLINE_S = 12.0


def message_size(key: bytes | None, value: bytes) -> int:
    """Bytes a record of this key and value takes against KAFKA_MAX_MESSAGE_BYTES."""
    return len(value) + len(key or b"") + RECORD_OVERHEAD_BYTES


@dataclass(frozen=True)
class Publish:
    """One event to send: keyed by persona id so a persona's events keep their order. An
    event of None is a tombstone: on a compacted topic it removes the key's last value."""

    topic: str
    key: str | None
    event: BaseModel | bytes | None


@dataclass
class Unreadable:
    """An offset whose batch could not be fetched or decompressed: it is dead-lettered by
    its coordinates alone (no value), with the fetch error as the reason."""

    topic: str
    partition: int
    offset: int
    reason: str
    key: bytes | None = None
    value: bytes | None = None


class EventTooLarge(ValueError):
    """An event over KAFKA_MAX_MESSAGE_BYTES; permanent, never retried."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"event for {topic} is {size} bytes; KAFKA_MAX_MESSAGE_BYTES is {limit}")
        self.topic, self.size, self.limit = topic, size, limit


class BrokerUnreachable(UserError):
    """A client could not start: no broker of KAFKA_BOOTSTRAP_SERVERS answered within the
    deadline, or one refused the client (security settings)."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message, RUNTIME)
        self.address = address

    @classmethod
    def no_answer(cls, address: str, tried_s: float, last_error: str | None) -> BrokerUnreachable:
        seen = f" (last error: {last_error})" if last_error else ""
        return cls(
            f"cannot reach Kafka at {address} (KAFKA_BOOTSTRAP_SERVERS): no answer in {tried_s:.0f} s{seen}; "
            "check that the broker is running and that KAFKA_BOOTSTRAP_SERVERS lists its host:port",
            address,
        )

    @classmethod
    def refused(cls, address: str, exc: KafkaError) -> BrokerUnreachable:
        return cls(
            f"Kafka at {address} (KAFKA_BOOTSTRAP_SERVERS) refused the client: {exc}; "
            "check KAFKA_SECURITY_PROTOCOL and the KAFKA_SASL_* / KAFKA_SSL_* settings",
            address,
        )


class _LastRecord(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


@contextlib.contextmanager
def _held_client_logs() -> Iterator[_LastRecord]:
    """aiokafka logs an error for every failed attempt to connect (24 over a minute at
    start); hold them back and keep only the last, for the one line that sums them up."""
    log = logging.getLogger("aiokafka")
    saved = log.level, log.propagate
    held = _LastRecord()
    log.addHandler(held)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield held
    finally:
        log.removeHandler(held)
        log.setLevel(saved[0])
        log.propagate = saved[1]


async def connect(
    settings: Settings,
    start: Callable[[], Awaitable[object]],
    close: Callable[[], Awaitable[object]],
    deadline_s: float = CONNECT_DEADLINE_S,
) -> None:
    """Start an aiokafka client (`start`), retrying with backoff for at most `deadline_s`.

    Raises BrokerUnreachable (after calling `close`) when no broker answered in time or one
    refused the client; any other error of `start` propagates unchanged, also after `close`.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + deadline_s
    delay = 0.2
    address = settings.kafka_bootstrap_servers
    with _held_client_logs() as held:
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await start()
                    return
                except KafkaError as exc:
                    if not exc.retriable:  # an authentication failure: trying again changes nothing
                        raise BrokerUnreachable.refused(address, exc) from None
                except (OSError, TimeoutError):
                    pass
                if loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
        except BaseException:
            await close()
            raise
    await close()
    raise BrokerUnreachable.no_answer(address, loop.time() - began, held.message)


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics; the persona and served-model topics are compacted (latest value per DID).

    Raises BrokerUnreachable when no broker answers within CONNECT_DEADLINE_S.
    """
    topics = settings.topics
    admin = AIOKafkaAdminClient(**settings.kafka_common(), request_timeout_ms=10_000)
    await connect(settings, admin.start, admin.close)
    try:
        new = [
            NewTopic(
                name,
                settings.kafka_topic_partitions,
                settings.kafka_topic_replication,
                topic_configs={"cleanup.policy": "compact"} if name in (topics.persona, topics.served_model) else None,
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
    """The one producer of a process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_bytes = settings.kafka_max_message_bytes
        # Idempotence stays off: Tansu's InitProducerId is broken, and every effect here
        # is idempotent by event id anyway.
        self.producer = AIOKafkaProducer(
            **settings.kafka_common(),
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            max_request_size=self.max_bytes,
        )

    async def start(self) -> None:
        """Connect; raises BrokerUnreachable when no broker answers within CONNECT_DEADLINE_S."""
        await connect(self.settings, self.producer.start, self.producer.stop)

    async def stop(self) -> None:
        await self.producer.flush()
        await self.producer.stop()

    def encode(self, item: Publish) -> tuple[bytes | None, bytes | None]:
        """(key, value) as sent; raises EventTooLarge when they would not fit one message."""
        if item.event is None or isinstance(item.event, bytes):
            value = item.event
        else:
            value = item.event.model_dump_json().encode()
        key = item.key.encode() if item.key else None
        size = message_size(key, value or b"")
        if size > self.max_bytes:
            metrics.EVENTS_TOO_LARGE.labels(topic=item.topic).inc()
            raise EventTooLarge(item.topic, size, self.max_bytes)
        return key, value

    async def publish(self, items: Iterable[Publish]) -> None:
        """Send all, then wait for every acknowledgement; a failure raises for a retry.

        Every event is encoded and size-checked before the first is sent, so an oversized
        one sends nothing of its batch.
        """
        encoded = [(item.topic, *self.encode(item)) for item in items]
        pending = [await self.producer.send(topic, value, key=key) for topic, key, value in encoded]
        await asyncio.gather(*pending)


class Ownership:
    """Which personas' events this consumer group member owns now.

    The consumer loop updates it on every assignment; producers key events by persona id
    with Kafka's murmur2 partitioner, so a persona belongs to exactly one partition of a
    topic and so to one member.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.partitions: frozenset[int] = frozenset()
        self.partition_count = 0
        # Bumped on every assignment: whoever caches per-persona state rebuilds it then.
        self.generation = 0
        self._partitioner = DefaultPartitioner()

    def assign(self, assignment: Iterable[TopicPartition], partition_count: int) -> None:
        self.partitions = frozenset(tp.partition for tp in assignment if tp.topic == self.topic)
        self.partition_count = partition_count
        self.generation += 1

    def owns(self, persona_id: str) -> bool:
        if self.partition_count <= 0:
            return False
        partition = self._partitioner(persona_id.encode(), list(range(self.partition_count)), None)
        return int(partition) in self.partitions
