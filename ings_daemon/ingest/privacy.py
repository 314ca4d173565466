"""Where PII redaction applies (INGS_REDACT_PII): before anything is embedded, stored or
trained on, the text of every interaction (`input`, `output` and the strings in its
metadata) and of every tune request's examples goes through `redact.redact`. Records are
redacted in a worker thread (about 50 ms per 32,000 characters, `redact`'s figure), and
the counts go to `ings_pii_redactions_total{kind}`; the originals are neither kept nor logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from ..contract.events import Example, Interaction, TuneRequest
from ..runtime.decode import Incoming
from . import redact

E = TypeVar("E", Interaction, TuneRequest)


def _json(value: Any, counts: Counter[str]) -> Any:
    """`value` with every string redacted; keys are kept (they name fields, not people)."""
    if isinstance(value, str):
        text, found = redact.redact(value)
        counts.update(found)
        return text
    if isinstance(value, dict):
        return {k: _json(v, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v, counts) for v in value]
    return value


def interaction(event: Interaction, counts: Counter[str]) -> Interaction:
    """The interaction with its text and metadata strings redacted."""
    fields = {"input": event.input, "output": event.output, "metadata": event.metadata}
    return event.model_copy(update=_json(fields, counts))


def tune_request(event: TuneRequest, counts: Counter[str]) -> TuneRequest:
    """The tune request with its examples' text redacted."""
    examples = [Example.model_construct(**_json(x.model_dump(), counts)) for x in event.training_data]
    return event.model_copy(update={"training_data": examples})


async def redacted(items: list[Incoming[E]], redactor: Callable[[E, Counter[str]], E]) -> list[Incoming[E]]:
    """`items` with each event passed through `redactor` (one of the two above)."""

    def run() -> tuple[list[Incoming[E]], Counter[str]]:
        counts: Counter[str] = Counter()
        return [dataclasses.replace(i, event=redactor(i.event, counts)) for i in items], counts

    done, counts = await asyncio.to_thread(run)
    redact.count(counts)
    return done
