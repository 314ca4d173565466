"""Feedback as both roles read it: the metadata it puts on a memory record, feedback waiting
for its exchange, and the two places it changes what is read (training data, recall order).

A rated exchange's memory record carries its latest feedback in reserved metadata keys; the
record's own input and output never change, so a train job's content hash stays valid
whatever feedback comes later, and erasing the record erases its feedback with it.
Feedback on an exchange not stored yet waits in the shared `feedback` collection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..contract.events import TrainExample
from ..contract.feedback import Feedback, Label
from ..contract.ids import digest
from .buckets import index_vector
from .chroma import Collections, Metadata, Record, Vector

LABEL = "feedback_label"  # "up", "down" or "neutral"
CORRECTION = "feedback_correction"  # "" when none
EVENT = "feedback_event_id"
AT = "feedback_ts"
# True when the record is preference data: up, down, or corrected.
LABELLED = "feedback_labelled"
# "" while the label waits for a job's preference set, then that job's id ("-": not labelled).
PREFERENCE_JOB = "preference_job"
WAITING = "feedback"  # the Collections target of feedback waiting for its exchange


def is_labelled(feedback: Feedback) -> bool:
    return feedback.label != "neutral" or bool(feedback.correction)


def patch(feedback: Feedback, event_id: str) -> Metadata:
    """The metadata keys `feedback` (event id `event_id`) sets on its exchange's record."""
    return {
        LABEL: feedback.label,
        CORRECTION: feedback.correction or "",
        EVENT: event_id,
        AT: time.time(),
        LABELLED: is_labelled(feedback),
        PREFERENCE_JOB: "" if is_labelled(feedback) else "-",
    }


def overlay(example: TrainExample, metadata: Metadata) -> TrainExample:
    """`example` with the feedback its record's `metadata` holds (`feedback`, `correction`)."""
    label = metadata.get(LABEL)
    correction = metadata.get(CORRECTION)
    return example.model_copy(
        update={
            "feedback": label if label in ("up", "down") else None,
            "correction": correction if isinstance(correction, str) and correction else None,
        }
    )


def answer_of(metadata: Metadata) -> str:
    """A memory's answer as the user wants it: its correction when it has one."""
    return str(metadata.get(CORRECTION) or metadata.get("output", ""))


def label_of(metadata: Metadata) -> Label | None:
    label = metadata.get(LABEL)
    return label if label in ("up", "down", "neutral") else None  # type: ignore[return-value]


def rerank(found: Sequence[Record], k: int, boost: float) -> list[Record]:
    """The `k` best of a recall's candidates by similarity (1 - cosine distance) plus
    `boost` for a memory rated up and minus it for one rated down (INGS_RECALL_FEEDBACK_BOOST);
    each record's `distance` is set to 1 - that score. Ties keep Chroma's order."""
    sign = {"up": 1.0, "down": -1.0}

    def score(r: Record) -> float:
        return 1.0 - (r.distance or 0.0) + boost * sign.get(str(r.metadata.get(LABEL)), 0.0)

    ranked = sorted(found, key=score, reverse=True)[:k]
    return [Record(r.id, r.document, r.metadata, r.embedding, 1.0 - score(r)) for r in ranked]


async def recall(collections: Collections, target: str, vector: Vector, k: int, boost: float) -> list[Record]:
    """The `k` memories of `target` (`memory_of(persona)`) closest to `vector`, ranked by
    `rerank` with `boost`; k + 10 candidates are read when it is not 0."""
    found = await collections.query(target, vector, k + 10 if boost else k)
    return rerank(found, k, boost)


def waiting_record(feedback: Feedback, event_id: str, received: float) -> Record:
    """Feedback kept until its exchange arrives: id derived from persona and event id, so a
    replay adds nothing; the event as JSON in the document."""
    return Record(
        id=waiting_id(feedback.persona_id, event_id),
        document=feedback.model_dump_json(exclude_none=True),
        metadata={
            "persona_id": feedback.persona_id,
            "memory_id": feedback.target,
            "event_id": event_id,
            "at": received,
        },
        embedding=index_vector(event_id),
    )


def waiting_id(persona_id: str, event_id: str) -> str:
    return digest("feedback", persona_id, event_id)
