"""The feedback events: `ings.feedback` (and `POST /feedback`) in, `ings.feedback-result` out.

A chat product's thumbs up/down, star rating or corrected answer, on one remembered
exchange of a persona. What the daemon does with it is in `ingest.feedback` and
docs/training.md ("Feedback and preference runs").
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StrictInt, StringConstraints, model_validator

from .events import Did, RequestId, ShortText, Strict, Text
from .ids import chat_event_id, interaction_id, utcnow

# A memory record id as `interaction_id` makes it (and as recall results and POST /interact
# answer it): 32 lower-case hex digits.
MemoryId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Label = Literal["up", "down", "neutral"]


class Feedback(Strict):
    """A rating of one answer the persona gave, named by exactly one of: the interaction's
    `interaction_event_id` (its `event_id`, as sent or as POST /interact answered it), the
    chat completion's `completion_id` (`/v1/chat/completions` records its exchange as event
    `chat-<completion id>`), or the `memory_id` a recall result or POST /interact gave.

    `rating` is "up" or "down", or 1..5 stars (4-5 count as up, 1-2 as down, 3 as neutral).
    A `correction` is the answer the user wanted: it replaces the original for supervised
    training, and the pair (correction chosen, original rejected) becomes preference data,
    whatever the rating. Later feedback on the same answer replaces earlier feedback."""

    persona_id: Did
    interaction_event_id: ShortText | None = None
    completion_id: ShortText | None = None
    memory_id: MemoryId | None = None
    rating: Literal["up", "down"] | Annotated[StrictInt, Field(ge=1, le=5)]
    correction: Text | None = None
    comment: Annotated[str, StringConstraints(max_length=2_000)] | None = None
    request_id: RequestId | None = None
    event_id: ShortText | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Feedback:
        named = [self.interaction_event_id, self.completion_id, self.memory_id]
        if sum(1 for n in named if n) != 1:
            raise ValueError("name the answer with exactly one of interaction_event_id, completion_id, memory_id")
        return self

    @property
    def target(self) -> str:
        """The memory record id of the rated exchange."""
        if self.memory_id:
            return self.memory_id
        event_id = self.interaction_event_id or chat_event_id(str(self.completion_id))
        return interaction_id(self.persona_id, event_id)

    @property
    def label(self) -> Label:
        """up, down or neutral: what preference training reads from the rating."""
        if isinstance(self.rating, str):
            return self.rating
        return "up" if self.rating >= 4 else "down" if self.rating <= 2 else "neutral"


class FeedbackResult(Strict):
    """What became of one feedback event: `applied` to the exchange it names, or `rejected`
    with the reason (the exchange never arrived within INGS_FEEDBACK_WAIT_S, too many were
    waiting, or the persona's memory refused it)."""

    persona_id: Did
    event_id: str
    request_id: str | None
    memory_id: str
    status: Literal["applied", "rejected"]
    label: Label
    reason: str | None = None
    at: datetime = Field(default_factory=utcnow)
