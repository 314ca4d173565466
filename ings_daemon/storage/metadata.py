"""An interaction's free-form metadata as Chroma can hold it: flat, typed, bounded.

Chroma's record metadata takes a string, an int64, a float, a bool, or a non-empty list
of one of those types (all elements the same type), under non-empty keys (Chroma 1.5).
A producer's metadata is any JSON, so `flatten` maps it onto that: nulls are dropped,
nested objects become dotted keys (`{"a": {"b": 1}}` -> `a.b`), lists are kept when Chroma
takes them (ints and floats mixed become floats), and what Chroma cannot hold (a list of
objects, a mixed list, an int beyond int64) is left out of the flat fields. The original
JSON is always kept beside them (`ORIGINAL`), so recall returns exactly what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

FlatValue = str | int | float | bool | list[str] | list[int] | list[float] | list[bool]
# Each flat key is a Chroma metadata field: thousands of them in one record break Chroma's
# metadata segment for every record, so only the first MAX_FIELDS (in document order) are
# indexed; the rest stay in the original JSON.
MAX_FIELDS = 64
MAX_KEY_CHARS = 128
PREFIX = "meta."
ORIGINAL = "metadata_json"
_INT64 = (-(2**63), 2**63 - 1)


def _scalar(value: Any) -> str | int | float | bool | None:
    """The value as Chroma stores it, or None when Chroma cannot (int beyond int64)."""
    if isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        # Chroma turns a larger int into a float and loses digits: the original JSON has it.
        return value if _INT64[0] <= value <= _INT64[1] else None
    return None


def _list(values: list[Any]) -> FlatValue | None:
    items = [_scalar(v) for v in values]
    kinds = {type(v) for v in items}
    if not items or None in items or (len(kinds) != 1 and kinds != {int, float}):
        return None
    if kinds == {int, float}:
        return [float(v) for v in items if isinstance(v, int | float)]
    return items  # type: ignore[return-value]  # one scalar type, checked above


def _leaves(value: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every non-object value, in document order; iterative, so
    nesting depth costs no stack (decoding already bounds it)."""
    stack: list[tuple[str, Any]] = [(PREFIX + key, child) for key, child in reversed(value.items())]
    while stack:
        key, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{key}.{k}", child) for k, child in reversed(node.items()))
        else:
            yield key, node


def flatten(metadata: dict[str, Any]) -> dict[str, FlatValue]:
    """The flat Chroma fields of `metadata`, each key prefixed `meta.`, at most MAX_FIELDS.

    Where two paths spell the same key (`{"a.b": 1, "a": {"b": 2}}`) the first one wins;
    keys longer than MAX_KEY_CHARS are left out. Never raises for JSON input.
    """
    flat: dict[str, FlatValue] = {}
    for key, value in _leaves(metadata):
        if len(flat) >= MAX_FIELDS:
            break
        if key in flat or len(key) > MAX_KEY_CHARS or value is None:
            continue
        kept = _list(value) if isinstance(value, list) else _scalar(value)
        if kept is not None:
            flat[key] = kept
    return flat


def original(metadata: dict[str, Any]) -> str:
    """The metadata as stored beside the flat fields: compact JSON, key order kept."""
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))


def restored(fields: dict[str, Any]) -> dict[str, Any]:
    """The metadata a stored record was sent with: the original JSON, or for a record
    stored before it was kept, its flat `meta.` fields without the prefix."""
    text = fields.get(ORIGINAL)
    if isinstance(text, str):
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    return {k.removeprefix(PREFIX): v for k, v in fields.items() if k.startswith(PREFIX)}
