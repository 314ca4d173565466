"""The feedback route against hostile producers, on the real ingest role and embedded Chroma
(no Kafka): a memory id is anyone's to name, but only its persona's feedback reaches it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from conftest import FakeRecord
from pydantic import ValidationError

from ings_daemon.config import Settings
from ings_daemon.contract.events import Interaction, TrainJob
from ings_daemon.contract.feedback import Feedback, FeedbackResult
from ings_daemon.contract.ids import interaction_id
from ings_daemon.ingest.handlers import Ingest
from ings_daemon.runtime.decode import Incoming
from ings_daemon.runtime.kafka import Ownership
from ings_daemon.runtime.router import Outcome
from ings_daemon.storage import feedback as stored
from ings_daemon.storage.chroma import Collections, memory_of
from ings_daemon.storage.embedder import Embedder

A = "did:nings:artificial:llm:alice:v1.0:aaaaaaaaaaaa"
B = "did:nings:artificial:llm:bob:v1.0:bbbbbbbbbbbb"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(None, 8, "float32")


def exchange(persona: str, event_id: str) -> Incoming[Interaction]:
    return Incoming(
        FakeRecord(None), Interaction(persona_id=persona, input=f"q {event_id}", output=f"a {event_id}"), event_id, {}
    )


def feedback(event_id: str, **fields: Any) -> Incoming[Feedback]:
    return Incoming(FakeRecord(None, topic="ings.feedback"), Feedback.model_validate(fields), event_id, {})


def answers(outcome: Outcome) -> dict[str, str]:
    return {p.event.event_id: p.event.status for p in outcome.publish if isinstance(p.event, FeedbackResult)}


def ingest(tmp_path: Path, models_dir: Path, embedder: Embedder, **settings: Any) -> Ingest:
    s = Settings(
        chromadb_path=tmp_path / "chroma",
        ings_models_dir=models_dir,
        ings_base_model="tiny-llama",
        ings_min_examples=1000,
        **settings,
    )
    ownership = Ownership(s.topics.interaction)
    ownership.assign([TopicPartition(s.topics.interaction, p) for p in range(3)], 3)
    return Ingest(s, Collections(s), embedder, ownership)


async def label(ing: Ingest, persona: str, memory_id: str) -> Any:
    got = await ing.collections.get(memory_of(persona), ids=[memory_id])
    return got[0].metadata.get(stored.LABEL) if got else None


@pytest.mark.parametrize("hostile_first", [False, True])
async def test_naming_another_personas_memory_never_reaches_it(
    tmp_path: Path, models_dir: Path, embedder: Embedder, hostile_first: bool
) -> None:
    ing = ingest(tmp_path, models_dir, embedder, ings_preference_min_labels=2, ings_feedback_wait_s=0.5)
    await ing.interactions([exchange(B, "b-1")])
    x = interaction_id(B, "b-1")
    own = feedback("fb-b", persona_id=B, memory_id=x, rating="up")
    hostile = feedback("fb-a", persona_id=A, memory_id=x, rating="down")
    out = await ing.feedback.handle([hostile, own] if hostile_first else [own, hostile])
    assert answers(out) == {"fb-b": "applied"}
    assert await label(ing, B, x) == "up" and ing.batcher.labels == {B: {x}}
    await asyncio.sleep(0.6)
    assert answers(await ing.feedback.expire()) == {"fb-a": "rejected"}


async def test_waiting_feedback_is_matched_by_persona_too(tmp_path: Path, models_dir: Path, embedder: Embedder) -> None:
    ing = ingest(tmp_path, models_dir, embedder, ings_preference_min_labels=2)
    await ing.interactions([exchange(A, "a-0")])
    xs = [interaction_id(B, f"b-{i}") for i in range(2)]
    waiting = await ing.feedback.handle(
        [feedback(f"fb-{i}", persona_id=A, memory_id=x, rating="down") for i, x in enumerate(xs)]
    )
    assert answers(waiting) == {} and ing.feedback.waiting == 2
    out = await ing.interactions([exchange(B, f"b-{i}") for i in range(2)])
    assert answers(out) == {} and not [p for p in out.publish if isinstance(p.event, TrainJob)]
    assert ing.batcher.labels == {} and [await label(ing, B, x) for x in xs] == [None, None]


async def test_a_resent_waiting_feedback_is_a_replay_even_at_the_limit(
    tmp_path: Path, models_dir: Path, embedder: Embedder
) -> None:
    ing = ingest(tmp_path, models_dir, embedder, ings_feedback_max_waiting=1)
    vote = {"persona_id": A, "interaction_event_id": "later", "rating": "up"}
    assert answers(await ing.feedback.handle([feedback("fb-1", **vote)])) == {}
    assert answers(await ing.feedback.handle([feedback("fb-1", **vote)])) == {}
    assert answers(await ing.feedback.handle([feedback("fb-2", **vote)])) == {"fb-2": "rejected"}
    assert answers(await ing.interactions([exchange(A, "later")])) == {"fb-1": "applied"}


def test_a_wait_must_be_finite() -> None:
    for bad in ("inf", "nan", "0", "-1"):
        with pytest.raises(ValidationError, match="ings_feedback_wait_s"):
            Settings(ings_feedback_wait_s=bad)


async def test_new_votes_on_the_same_memories_make_a_new_job(
    tmp_path: Path, models_dir: Path, embedder: Embedder
) -> None:
    ing = ingest(tmp_path, models_dir, embedder, ings_preference_min_labels=2)
    await ing.interactions([exchange(A, "a-0"), exchange(A, "a-1")])

    async def vote(tag: str, first: str, second: str) -> list[TrainJob]:
        out = await ing.feedback.handle(
            [
                feedback(f"{tag}-0", persona_id=A, interaction_event_id="a-0", rating=first),
                feedback(f"{tag}-1", persona_id=A, interaction_event_id="a-1", rating=second),
            ]
        )
        for then in out.then:  # what the router runs once the job is published
            await then()
        return [p.event for p in out.publish if isinstance(p.event, TrainJob)]

    (first,) = await vote("v1", "up", "down")
    (second,) = await vote("v2", "down", "up")
    assert first.preference is not None and second.preference is not None
    assert first.preference.ids == second.preference.ids and first.job_id != second.job_id
    assert await vote("v2", "down", "up") == []  # the same votes again: a replay, no job


async def test_feedback_waiting_on_an_exchange_stored_by_a_failed_attempt_is_applied_on_the_retry(
    tmp_path: Path, models_dir: Path, embedder: Embedder
) -> None:
    """The batch's write landed, then the attempt failed: its retry finds the exchange
    stored, embeds nothing, and still applies the feedback that waited for it (it must not
    wait out its time and be refused as never stored)."""
    ing = ingest(tmp_path, models_dir, embedder)
    x = interaction_id(A, "e-1")
    assert answers(await ing.feedback.handle([feedback("fb-1", persona_id=A, memory_id=x, rating="up")])) == {}
    on_stored = ing.feedback.on_stored

    async def fail(records: Any) -> Outcome:
        raise RuntimeError("the attempt failed after its write")

    ing.feedback.on_stored = fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await ing.interactions([exchange(A, "e-1")])
    ing.feedback.on_stored = on_stored  # type: ignore[method-assign]
    assert await label(ing, A, x) is None
    assert answers(await ing.interactions([exchange(A, "e-1")])) == {"fb-1": "applied"}
    assert await label(ing, A, x) == "up"
