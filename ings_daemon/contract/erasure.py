"""The erasure events: `ings.forget` in, `ings.forget-result` and `ings.adapter-retired` out.

What an erasure does is in `ingest.forget` and docs/privacy.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from .events import Did, RequestId, ShortText, Strict
from .ids import utcnow


class ForgetRequest(Strict):
    """Erase memories: all of a persona's (`persona`: its registry entry and tune examples
    too), one session's (`session`, with `session_id`), or named interactions' (`events`,
    with their `event_ids`)."""

    request_id: RequestId
    persona_id: Did
    scope: Literal["persona", "session", "events"]
    session_id: RequestId | None = None  # never empty: "" would name no session
    event_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=10_000
    )
    event_id: ShortText | None = None

    @model_validator(mode="after")
    def _scope_fields(self) -> ForgetRequest:
        wanted = {"persona": (False, False), "session": (True, False), "events": (False, True)}[self.scope]
        if (self.session_id is not None, self.event_ids is not None) != wanted:
            needs = {"persona": "neither session_id nor event_ids", "session": "session_id only"}
            raise ValueError(f"scope {self.scope!r} takes {needs.get(self.scope, 'event_ids only')}")
        return self


class ForgetResult(Strict):
    """What an `ings.forget` (or a retention sweep, `request_id` "retention-<digest>") erased,
    or why it erased nothing (`rejected`)."""

    request_id: str | None
    persona_id: Did | None
    scope: Literal["persona", "session", "events", "retention"] | None
    memories_deleted: int
    examples_deleted: int
    # Train jobs published but not yet trained that named erased examples: they train
    # without them, or are dropped when fewer than INGS_MIN_EXAMPLES remain.
    jobs_affected: int
    adapters_retired: list[int]
    retrain_job_id: str | None = None
    # Why nothing was erased: the request did not validate (it is also dead-lettered).
    rejected: str | None = None
    at: datetime = Field(default_factory=utcnow)


class AdapterRetired(Strict):
    """An adapter version trained on data that has since been erased: serving layers should
    unload it. The version stays in the store, listed in the persona's erasure ledger."""

    persona_id: Did
    version: int
    reason: Literal["erasure", "retention"]
    request_id: str | None
    at: datetime = Field(default_factory=utcnow)
