"""Where PII redaction applies (INGS_REDACT_PII): before anything is embedded, stored or
trained on, the text of every interaction (`input`, `output`, and in its metadata every string,
every key and every integer long enough to be a card or phone number) and of every tune
request's examples goes through `redact.redact`. Records are redacted in a worker thread (about
5 ms per 32,000 characters of prose, 110 ms of digit-dense text: `redact`'s figures), and the
counts go to `ings_pii_redactions_total{kind}`; the originals are neither kept nor logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from ..contract.events import Example, Interaction, TuneRequest
from ..contract.feedback import Feedback
from ..runtime.decode import Incoming
from . import redact

E = TypeVar("E", Interaction, TuneRequest, Feedback)


# An integer shorter than this is no card (13 digits at least, ISO/IEC 7812) nor a phone number
# without its "+" (7 digits at least in any national plan the regions use); not worth a look.
_SHORTEST_NUMBER = 10**6


def _text(value: str, counts: Counter[str]) -> str:
    text, found = redact.redact(value)
    counts.update(found)
    return text


def _json(value: Any, counts: Counter[str]) -> Any:
    """`value` with every string and every object key redacted, and an integer that is a card or
    a phone number written as digits (`4111111111111111`, `14155552671`) replaced by what its
    decimal string redacts to (`"[CARD]"`, `"[PHONE]"`: a string then). Floats, booleans, nulls
    and shorter integers are kept as they are."""
    if isinstance(value, str):
        return _text(value, counts)
    if isinstance(value, dict):
        return _object(value, counts)
    if isinstance(value, list):
        return [_json(v, counts) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _SHORTEST_NUMBER:
        text, found = redact.redact(str(value))
        if found:
            counts.update(found)
            return text
    return value


def _object(value: dict[str, Any], counts: Counter[str]) -> dict[str, Any]:
    """The object with its keys and values redacted. A key is someone's identifier as often as a
    field name (`{"alice@example.com": "admin"}`) and is stored too (as `meta.<key>`), so it is
    redacted like a string. Keys that redact alike are kept apart, none dropped: the first takes
    the redacted key, the next ones `#2`, `#3`, ... after it (`[EMAIL]`, `[EMAIL]#2`), skipping
    any key already in the object, in the object's order."""
    renamed = {key: _text(key, counts) for key in value}
    taken = {key for key, new in renamed.items() if new == key}
    out: dict[str, Any] = {}
    for key, item in value.items():
        new = renamed[key]
        if new != key:
            n, unique = 1, new
            while unique in taken:
                n += 1
                unique = f"{new}#{n}"
            taken.add(unique)
            new = unique
        out[new] = _json(item, counts)
    return out


def interaction(event: Interaction, counts: Counter[str]) -> Interaction:
    """The interaction with its text and metadata redacted."""
    update = {
        "input": _text(event.input, counts),
        "output": _text(event.output, counts),
        "metadata": _object(event.metadata, counts),
    }
    return event.model_copy(update=update)


def tune_request(event: TuneRequest, counts: Counter[str]) -> TuneRequest:
    """The tune request with its examples' text redacted."""
    examples = [
        Example.model_construct(**{field: _json(v, counts) for field, v in x.model_dump().items()})
        for x in event.training_data
    ]
    return event.model_copy(update={"training_data": examples})


def feedback(event: Feedback, counts: Counter[str]) -> Feedback:
    """The feedback with its correction and comment redacted (a correction becomes training data)."""
    update = {k: _text(v, counts) for k, v in (("correction", event.correction), ("comment", event.comment)) if v}
    return event.model_copy(update=update)


async def redacted(items: list[Incoming[E]], redactor: Callable[[E, Counter[str]], E]) -> list[Incoming[E]]:
    """`items` with each event passed through `redactor` (one of the three above)."""

    def run() -> tuple[list[Incoming[E]], Counter[str]]:
        counts: Counter[str] = Counter()
        return [dataclasses.replace(i, event=redactor(i.event, counts)) for i in items], counts

    done, counts = await asyncio.to_thread(run)
    redact.count(counts)
    return done
