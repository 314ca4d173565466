"""From a record's bytes to a validated event, or `Invalid` with an error type.

Everything a record can hold is caught here, before a handler sees it: bytes that are not
UTF-8 JSON, duplicate keys (two parsers could read two different events), NaN and
Infinity, numbers too long to convert, nesting deeper than MAX_DEPTH, lone UTF-16
surrogates (valid JSON escapes that no UTF-8 encoder accepts), and any exception from the
model or the event id derivation. Nothing raised while decoding escapes as anything but
`Invalid`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ..contract.ids import derived_event_id
from . import logs
from .kafka import Record

M = TypeVar("M", bound=BaseModel)
# Deeper than any event of the contract needs (a persona's metadata is free-form, but 32
# levels is generous), and far below Python's recursion limit.
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class Invalid(Exception):
    """A record that can never be processed; `kind` is its dead letter's `error_type`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Incoming(Generic[M]):
    """One decoded record: the record itself, its event, its idempotency key and the JSON."""

    record: Record
    event: M
    event_id: str
    payload: dict[str, Any]


@dataclass
class Body:
    """An HTTP body in the shape `decode` reads (a record with no Kafka coordinates)."""

    topic: str
    value: bytes | None
    partition: int = -1
    offset: int = -1
    key: bytes | None = None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate key {dup[:64]!r}")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity. Raises Invalid.

    A malformed text nested about 1,000 deep may read as `too_deep` or `not_json`
    depending on which the parser meets first; either way it is dead-lettered.
    """
    try:
        # UTF-8 only (json.loads would also take UTF-16/32 bytes); a UTF-8 byte order mark
        # is ignored, as RFC 8259 section 8.1 allows.
        text = raw.decode("utf-8").removeprefix("\ufeff")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise Invalid("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        reason = str(exc)
        if "int_max_str_digits" in reason:  # Python's own hint is no use to a producer
            reason = f"a number has more than {sys.get_int_max_str_digits()} digits"
        raise Invalid("not_json", f"value is not JSON: {reason[:300]}") from None


def check_tree(value: Any) -> None:
    """Raise Invalid for nesting deeper than MAX_DEPTH, a string (or key) that cannot be
    encoded as UTF-8, or a number out of float range; iterative, so depth cannot exhaust
    the stack."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise Invalid("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels (at {path[:200] or 'top'})")
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise Invalid(
                    "invalid_unicode", f"text at {path[:200] or 'top'} holds a lone UTF-16 surrogate (not UTF-8)"
                )
        elif isinstance(node, dict):
            for key, child in node.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise Invalid("invalid_unicode", f"a key at {path[:200] or 'top'} holds a lone UTF-16 surrogate")
                stack.append((child, depth + 1, where))
        elif isinstance(node, float) and not math.isfinite(node):
            # 1e400 parses to inf without passing parse_constant; no event holds it.
            raise Invalid("not_json", f"number at {path[:200] or 'top'} is out of range")
        elif isinstance(node, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))


def _validation_reason(model: type[BaseModel], exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    bad_did = any(err["type"] == "string_pattern_mismatch" and str(err["loc"][-1]) == "persona_id" for err in errors)
    # A location can hold a producer's key of any length: keep each part short.
    detail = "; ".join(f"{'.'.join(str(p)[:64] for p in e['loc']) or 'event'}: {e['msg'][:200]}" for e in errors[:10])
    return ("invalid_did" if bad_did else "invalid_event"), f"{model.__name__} validation failed: {detail}"


def decode(record: Record, model: type[M], max_bytes: int) -> Incoming[M]:
    """Decode and validate one record. Raises Invalid (and nothing else)."""
    try:
        raw = record.value
        if not raw:
            raise Invalid("empty", "record has no value")
        if len(raw) > max_bytes:
            raise Invalid("too_large", f"value is {len(raw)} bytes; INGS_MAX_EVENT_BYTES is {max_bytes}")
        payload = parse_json(raw)
        check_tree(payload)
        if not isinstance(payload, dict):
            raise Invalid("not_object", f"value is JSON {type(payload).__name__}, expected an object")
        try:
            event = model.model_validate(payload)
        except ValidationError as exc:
            raise Invalid(*_validation_reason(model, exc)) from None
        # Derived from the validated event, not the bytes: every spelling of one event
        # (origin names, a wrapper, surrounding spaces, an explicit default) is one event.
        canonical = event.model_dump(mode="json", exclude={"event_id"})
        event_id = getattr(event, "event_id", None) or derived_event_id(model.__name__, canonical)
        return Incoming(record=record, event=event, event_id=event_id, payload=payload)
    except Invalid:
        raise
    except Exception as exc:
        raise Invalid("decode_error", logs.describe(exc)) from None


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """The record's JSON object if it is a clean one, else None (for rejection answers)."""
    try:
        value = parse_json(raw or b"")
        check_tree(value)
    except Invalid:
        return None
    return value if isinstance(value, dict) else None
