"""Feedback shaping the data, the preference losses against the papers' formulas, and the
preference phase's weights and refusal on a tiny model (plumbing; learning is measured on
the real model in test_real_preference.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ings_daemon.contract.events import TrainExample
from ings_daemon.contract.feedback import Feedback
from ings_daemon.contract.ids import interaction_id
from ings_daemon.dev.persona_eval import load_chat_model
from ings_daemon.dev.tinymodel import make_tiny_model
from ings_daemon.storage.chroma import Record
from ings_daemon.storage.feedback import overlay, patch, rerank
from ings_daemon.trainer.data import UP_WEIGHT, Encoded, PromptFormat, encode, supervised, weighted
from ings_daemon.trainer.gate import GateLimits, preference_verdict
from ings_daemon.trainer.preference import (
    BETA,
    PREFERENCE_GATE_MIN,
    Labelled,
    dpo_loss,
    kto_loss,
    kto_weights,
    labelled,
    objective_of,
    split_labels,
    train_preferences,
)

DID = "did:nings:artificial:llm:gardener:v1.0:7c2e9a41d0b3"


def ex(i: int, **feedback: Any) -> TrainExample:
    return TrainExample(id=f"e{i}", input=f"question {i}", output=f"answer {i}", **feedback)


def test_feedback_names_one_exchange_and_maps_stars() -> None:
    by_event = Feedback(persona_id=DID, interaction_event_id="ev-1", rating="down")
    assert by_event.target == interaction_id(DID, "ev-1") and by_event.label == "down"
    by_chat = Feedback(persona_id=DID, completion_id="cmpl-9", rating=5)
    assert by_chat.target == interaction_id(DID, "chat-cmpl-9") and by_chat.label == "up"
    assert Feedback(persona_id=DID, memory_id="a" * 32, rating=3).label == "neutral"
    for named in ({}, {"interaction_event_id": "a", "completion_id": "b"}):
        with pytest.raises(ValidationError, match="exactly one"):
            Feedback.model_validate({"persona_id": DID, "rating": "up", **named})
    for bad in ({"rating": 0}, {"rating": 6}, {"rating": "4"}, {"rating": True}, {"memory_id": "../../etc"}):
        with pytest.raises(ValidationError):
            Feedback.model_validate({"persona_id": DID, "memory_id": "b" * 32, "rating": "up", **bad})


@given(st.integers(1, 5), st.one_of(st.none(), st.text("ab <>|\u00e9\n", max_size=40).filter(str.strip)))
def test_a_label_is_what_training_reads(stars: int, correction: str | None) -> None:
    fb = Feedback(persona_id=DID, interaction_event_id="e", rating=stars, correction=correction)
    meta = patch(fb, "fb-1")
    example = overlay(ex(0), meta)
    assert example.feedback == {5: "up", 4: "up", 2: "down", 1: "down"}.get(stars)
    assert example.correction == fb.correction and (fb.correction is None) == (correction is None)
    # Labelled (preference data, waiting for a job) exactly when up, down or corrected.
    assert meta["feedback_labelled"] == (stars != 3 or correction is not None)
    assert meta["preference_job"] == ("" if meta["feedback_labelled"] else "-")


def test_feedback_shapes_the_supervised_set() -> None:
    examples = [ex(0), ex(1, feedback="down"), ex(2, feedback="down", correction="better 2"), ex(3, feedback="up")]
    kept = supervised(examples)
    assert [(e.id, e.output) for e in kept] == [("e0", "answer 0"), ("e2", "better 2"), ("e3", "answer 3")]
    assert [e.id for e in weighted(kept)] == ["e0", "e2"] + ["e3"] * UP_WEIGHT


def test_labels_and_objective() -> None:
    def enc(i: str, o: str) -> Encoded:
        return Encoded(ids=[1, 2, len(o)], prompt_len=2)

    items = labelled([ex(0), ex(1, feedback="up"), ex(2, feedback="down"), ex(3, feedback="up", correction="c")], enc)
    assert [(i.id, i.kind) for i in items] == [("e1", "desirable"), ("e2", "undesirable"), ("e3", "pair")]
    assert objective_of(items) == "kto" and objective_of(items[2:]) == "dpo"


def test_held_out_labels_are_stable_and_gated_from_the_minimum() -> None:
    def items(n: int) -> list[Labelled]:
        return [Labelled(f"l{i}", Encoded([1, 2], 1), None) for i in range(n)]

    train, held = split_labels(items(PREFERENCE_GATE_MIN - 1))
    assert len(train) == PREFERENCE_GATE_MIN - 1 and held == []
    train, held = split_labels(items(20))
    assert len(held) == 4 and len(train) == 16
    again = split_labels(list(reversed(items(20))))[1]
    assert {i.id for i in again} == {i.id for i in held}


def test_dpo_loss_is_the_papers() -> None:
    # Rafailov et al. 2023, eq. 7: -log sigmoid(beta * ((2 - 0) - (-2 - 0))).
    chosen, rejected, ref = torch.tensor([2.0]), torch.tensor([-2.0]), torch.tensor([0.0])
    assert float(dpo_loss(chosen, rejected, ref, ref)) == pytest.approx(-math.log(1 / (1 + math.exp(-BETA * 4))))
    assert float(dpo_loss(ref, ref, ref, ref)) == pytest.approx(math.log(2))


def test_kto_loss_is_the_papers() -> None:
    # Ethayarajh et al. 2024, eq. 8: at r = z0 each side costs lambda * (1 - sigmoid(0)).
    logps, ref = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    desirable = torch.tensor([True, False])
    assert float(kto_loss(logps, ref, desirable, torch.tensor(1.0))) == pytest.approx(0.5)
    # A desirable answer made likelier costs less; an undesirable one made likelier, more.
    up = kto_loss(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([True]), torch.tensor(0.0))
    bad = kto_loss(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([False]), torch.tensor(0.0))
    assert float(up) == pytest.approx(1 - 1 / (1 + math.exp(-BETA * 3))) and float(bad) > 0.5 > float(up)
    lam_d, lam_u = kto_weights(2, 6)
    assert lam_d * 2 / (lam_u * 6) == pytest.approx(1.0) and kto_weights(0, 3) == (1.0, 1.0)


def test_preference_verdict() -> None:
    limits = GateLimits(min_preference=0.75, max_retention_kl=1.0)
    assert preference_verdict(limits, 0.8, 0.5) == ("passed", [])
    assert preference_verdict(limits, None, 0.5) == ("not_gated", [])
    decision, reasons = preference_verdict(limits, 0.5, 1.5)
    assert decision == "failed" and "INGS_GATE_MIN_PREFERENCE" in reasons[0] and "retention" in reasons[1]
    assert preference_verdict(limits, math.nan, 0.5)[0] == "failed"
    assert preference_verdict(GateLimits(enabled=False), 0.0, 9.0) == ("off", [])


def test_recall_prefers_memories_rated_up() -> None:
    def rec(i: str, distance: float, label: str | None = None) -> Record:
        return Record(i, "", {"feedback_label": label} if label else {}, None, distance)

    found = [rec("a", 0.10, "down"), rec("b", 0.12), rec("c", 0.14, "up"), rec("d", 0.5)]
    assert [r.id for r in rerank(found, 3, 0.0)] == ["a", "b", "c"]
    ranked = rerank(found, 3, 0.05)
    assert [r.id for r in ranked] == ["c", "b", "a"] and ranked[0].distance == pytest.approx(0.09)


@pytest.mark.timeout(300)
def test_a_refused_phase_restores_the_supervised_weights(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    make_tiny_model(tmp_path / "tiny", chat_template=True)
    model, tokenizer = load_chat_model(str(tmp_path / "tiny"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fmt = PromptFormat.of(tokenizer, None)

    def enc(i: str, o: str) -> Encoded:
        return encode(tokenizer, TrainExample(id="", input=i, output=o), 64, fmt)

    items = labelled([ex(i, feedback="up" if i % 2 else "down", correction=None) for i in range(10)], enc)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # LoRA's B starts at zero: make the adapter do something first
            p.add_(0.01)
    before = [p.detach().clone() for p in params]
    steps: list[int] = []
    order = torch.Generator().manual_seed(0)
    refuse = GateLimits(min_preference=1.01)  # no phase can reach it
    train, held = split_labels(items)
    report, kl = train_preferences(
        peft_model,
        train,
        held,
        refuse,
        lambda: 0.1,
        tokenizer.pad_token_id,
        None,
        order,
        lambda s, t, v: steps.append(s),
    )
    assert report.gate == "failed" and report.objective == "sft" and "INGS_GATE_MIN_PREFERENCE" in str(report.refused)
    assert report.labels == 8 and report.eval_labels == 2 and steps[-1] == report.steps and kl == 0.1
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    accept = GateLimits(min_preference=0.0)
    report, _ = train_preferences(
        peft_model, train, held, accept, None, tokenizer.pad_token_id, None, order, lambda *a: None
    )
    assert report.gate == "passed" and report.objective == "kto" and math.isfinite(report.last_loss)
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # Corrections only: DPO, anchored by replay examples.
    pairs = labelled([ex(i, feedback="down", correction=f"better {i}") for i in range(10)], enc)
    anchors = [enc("a general question", "a general answer")]
    train, held = split_labels(pairs)
    report, _ = train_preferences(
        peft_model, train, held, accept, None, tokenizer.pad_token_id, None, order, lambda *a: None, anchors
    )
    assert report.objective == "dpo" and report.gate == "passed" and report.accuracy is not None
