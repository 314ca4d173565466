"""Dead letters: what goes to `ings.dlq` for a record that cannot be processed.

A letter carries the record's coordinates, the reason and an `error_type`, and the
original value when the letter still fits KAFKA_MAX_MESSAGE_BYTES (base64 grows it by a
third); otherwise its first bytes, its full size and its sha256, so a 4 MB record is
recorded, not retried forever. A batch that cannot even be fetched is recorded by its
coordinates alone.
"""

from __future__ import annotations

import base64
import hashlib

from ..contract.events import DeadLetter
from .kafka import Record

# Room for the letter's other fields: the reason (at most REASON_CHARS, JSON-escaped up to
# 6 bytes a character), the key, topic and timestamps.
REASON_CHARS = 2000
KEY_CHARS = 1000
ENVELOPE_BYTES = 6 * REASON_CHARS + 6 * KEY_CHARS + 4096
PREFIX_BYTES = 64 * 1024

# The error types a letter can carry; docs/events.md (the "Dead letter" table) lists them for users.
ERROR_TYPES = (
    "empty",  # the record has no value (null or zero bytes)
    "too_large",  # the value is over INGS_MAX_EVENT_BYTES
    "not_json",  # not UTF-8 JSON, or JSON with duplicate keys, NaN/Infinity or huge numbers
    "too_deep",  # JSON nested deeper than the router's limit
    "invalid_unicode",  # text holding lone UTF-16 surrogates, which cannot be UTF-8
    "not_object",  # JSON, but not an object
    "invalid_did",  # a persona_id that does not follow the DID grammar
    "invalid_event",  # the event model's validation failed
    "decode_error",  # anything else raised while turning the record into an event
    "processing_error",  # the handler failed on this record alone, after retries
    "fetch_error",  # the batch holding this offset could not be fetched or decompressed
    "persona_limit",  # an interaction for a new persona beyond INGS_MAX_PERSONAS
)


def _text(raw: bytes | None, limit: int) -> str | None:
    return raw.decode("utf-8", "replace")[:limit] if raw is not None else None


def clean_text(text: str, limit: int = REASON_CHARS) -> str:
    """`text` cut to `limit` characters with anything UTF-8 cannot hold (lone surrogates)
    replaced by "?", so it can go into any event."""
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


def letter_for(record: Record, reason: str, error_type: str, max_message_bytes: int) -> DeadLetter:
    """The dead letter of one record, sized to fit one Kafka message."""
    value = record.value
    if value is None:
        encoded, truncated, size, sha = None, False, 0, None
    else:
        size, sha = len(value), hashlib.sha256(value).hexdigest()
        room = max(0, (max_message_bytes - ENVELOPE_BYTES) * 3 // 4)
        truncated = size > room
        kept = value[: min(room, PREFIX_BYTES)] if truncated else value
        encoded = base64.b64encode(kept).decode()
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=_text(record.key, KEY_CHARS),
        value_b64=encoded,
        value_truncated=truncated,
        value_size=size,
        value_sha256=sha,
        reason=clean_text(reason),
        error_type=error_type,
    )


def original_value(letter: DeadLetter) -> bytes | None:
    """The original bytes when the letter holds them whole, else None (truncated or absent)."""
    if letter.value_b64 is None or letter.value_truncated:
        return None
    return base64.b64decode(letter.value_b64)
