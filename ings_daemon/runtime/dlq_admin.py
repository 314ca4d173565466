"""Operator tools for the dead-letter topic: read its letters, re-send their original bytes.

Reading assigns every partition of the DLQ topic without a consumer group (nothing is
committed) and reads from the beginning to the end each partition had when reading began.
The end comes from the highwater of a fetch response: Tansu answers ListOffsets(latest)
wrongly, so `end_offsets()` cannot be trusted there.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from ..config import Settings
from ..contract.events import DeadLetter
from .deadletters import original_value
from .kafka import Producer, Publish, connect, message_size

# No record and no highwater progress for this long ends a read that has not reached the
# highwater it saw (a gap such as transaction markers at the end of a partition).
IDLE_S = 2.0

Located = tuple[int, int, DeadLetter]


def _warn(message: str) -> None:
    print(f"ings-daemon dlq: {message}", file=sys.stderr, flush=True)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _matches(letter: DeadLetter, topic: str | None, error_type: str | None, since: datetime | None) -> bool:
    return (
        (topic is None or letter.topic == topic)
        and (error_type is None or letter.error_type == error_type)
        and (since is None or _utc(letter.at) >= _utc(since))
    )


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, or none when it does not exist; never creates it."""
    if topic not in await consumer.topics():  # a metadata request for all topics
        return []
    found = consumer.partitions_for_topic(topic)
    if not found:  # the client's own metadata predates the topic
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(found or ())]


async def read_dead_letters(
    settings: Settings, *, topic: str | None, error_type: str | None, since: datetime | None
) -> list[Located]:
    """Every letter on the DLQ topic so far as (dlq_partition, dlq_offset, letter), in
    partition then offset order, keeping those from `topic` (a full topic name), of
    `error_type` and dead-lettered at or after `since` (naive times are UTC).

    Raises BrokerUnreachable when no broker answers within CONNECT_DEADLINE_S.
    A DLQ record that is not a DeadLetter is skipped with a warning on stderr.
    """
    consumer = AIOKafkaConsumer(
        **settings.kafka_common(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await connect(settings, consumer.start, consumer.stop)
    found: list[Located] = []
    try:
        parts = await _partitions(consumer, settings.topics.dlq)
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends: dict[TopicPartition, int] = {}
        pending = set(parts)
        last_progress = time.monotonic()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=300)
            for tp in pending:
                highwater = consumer.highwater(tp)
                if tp not in ends and highwater is not None:
                    ends[tp] = highwater
                    last_progress = time.monotonic()
            for tp, records in batch.items():
                last_progress = time.monotonic()
                for record in records:
                    if tp in ends and record.offset >= ends[tp]:
                        continue  # written after reading began
                    try:
                        letter = DeadLetter.model_validate_json(record.value or b"")
                    except ValidationError as exc:
                        _warn(f"skipped {tp.partition}:{record.offset}, not a dead letter: {exc.errors()[0]['msg']}")
                        continue
                    if _matches(letter, topic, error_type, since):
                        found.append((tp.partition, record.offset, letter))
            pending -= {tp for tp in pending if tp in ends and await consumer.position(tp) >= ends[tp]}
            if pending and time.monotonic() - last_progress > IDLE_S:
                stuck = ", ".join(f"{tp.partition}/{ends.get(tp)}" for tp in sorted(pending))
                _warn(f"stopped reading: nothing more within {IDLE_S:.0f} s (partition/end: {stuck})")
                break
    finally:
        await consumer.stop()
    return sorted(found, key=lambda item: (item[0], item[1]))


def _unsendable(letter: DeadLetter, value: bytes | None) -> str | None:
    """Why a letter cannot be re-sent, or None when its bytes are whole and intact."""
    if letter.value_b64 is None:
        if letter.error_type == "fetch_error":
            return "fetch_error: the batch could not be fetched, no bytes were recorded"
        return "the record had no value"
    if letter.value_size == 0:
        return "the record's value was empty: re-sending it would only fail again"
    if value is None:
        return f"value truncated: the letter keeps only a prefix of the {letter.value_size} bytes"
    if letter.value_sha256 is not None and hashlib.sha256(value).hexdigest() != letter.value_sha256:
        return "value does not match its sha256"
    return None


def plan_redrive(settings: Settings, letters: Iterable[DeadLetter]) -> tuple[list[Publish], list[str]]:
    """What `redrive` would send, and one reason per letter it would skip.

    Letters without their whole bytes (truncated, fetch_error, empty) are skipped, and so
    is a second letter for the same topic/partition/offset, so each record goes once. Only
    the daemon's input topics are written: anyone who can write to the DLQ could forge a
    letter naming `ings.persona` or any other topic.
    The key is the letter's text key: a key that was not UTF-8 or over 1000 characters
    comes back altered.
    """
    items: list[Publish] = []
    skipped: list[str] = []
    seen: set[tuple[str, int, int]] = set()
    t = settings.topics
    inputs = {t.handshake, t.interaction, t.tune_request, t.recall_request, t.feedback, t.train_job}
    for letter in letters:
        value = original_value(letter)
        why = _unsendable(letter, value)
        if why is None and letter.topic not in inputs:
            why = f"{letter.topic} is not an input topic of this daemon"
        if why is None and (letter.topic, letter.partition, letter.offset) in seen:
            why = "a duplicate letter of a record already re-sent"
        size = message_size((letter.key or "").encode(), value or b"")
        if why is None and size > settings.kafka_max_message_bytes:
            why = f"{size} bytes is over KAFKA_MAX_MESSAGE_BYTES {settings.kafka_max_message_bytes}"
        if why is not None or value is None:
            skipped.append(f"{letter.topic}[{letter.partition}]@{letter.offset}: {why}")
            continue
        seen.add((letter.topic, letter.partition, letter.offset))
        items.append(Publish(letter.topic, letter.key, value))
    return items, skipped


async def redrive(settings: Settings, letters: Iterable[DeadLetter]) -> tuple[int, list[str]]:
    """Re-send each letter's original bytes to its original topic with its original key,
    as `plan_redrive` decides; returns (number sent, one reason per skipped letter)."""
    items, skipped = plan_redrive(settings, letters)
    if items:
        producer = Producer(settings)
        await producer.start()
        try:
            await producer.publish(items)
        finally:
            await producer.stop()
    return len(items), skipped
