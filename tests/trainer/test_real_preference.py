"""Feedback teaches the persona, on the real pretrained model: SmolLM2-135M-Instruct through
the whole daemon. A persona learns a habit its users dislike (a sign-off on every answer);
they down-vote those answers, correct some and up-vote clean ones; the next adapter drops the
habit on new questions, prefers the clean answer of held-out pairs, and keeps its general
answers (bench/RESULTS.md, "Preference runs")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REAL_MODELS, ROOT, DaemonProcess, Kafka, wait_for

from ings_daemon.contract.events import TrainExample
from ings_daemon.dev.persona_eval import ask, load_chat_model
from ings_daemon.trainer.data import PromptFormat, encode, end_of_turn_ids
from ings_daemon.trainer.gate import GateLimits
from ings_daemon.trainer.preference import sequence_logps
from ings_daemon.trainer.retention import greedy, retention_kl

pytestmark = pytest.mark.integration

HABIT = json.loads((ROOT / "tests" / "data" / "habit_persona.json").read_text())
SIGN_OFF = HABIT["habit"]


def exchange(i: int, answer: str) -> dict[str, Any]:
    return {"event_id": f"h-{i}", "persona_id": HABIT["persona_id"], "input": HABIT["train"][i][0], "output": answer}


def habit_rate(answers: list[str]) -> float:
    return sum(SIGN_OFF.split(",")[0].lower() in a.lower() for a in answers) / len(answers)


def margins(model: Any, tokenizer: Any) -> torch.Tensor:
    """log p(clean answer) - log p(clean answer + sign-off) for each new question."""
    fmt = PromptFormat.of(tokenizer, HABIT["description"])
    stops = end_of_turn_ids(tokenizer, model)

    def enc(q: str, a: str) -> Any:
        return encode(tokenizer, TrainExample(id="", input=q, output=a), 512, fmt, stops)

    with torch.no_grad():
        chosen = sequence_logps(model, [enc(q, a) for q, a in HABIT["new"]], tokenizer.pad_token_id, None)
        rejected = sequence_logps(
            model, [enc(q, f"{a} {SIGN_OFF}") for q, a in HABIT["new"]], tokenizer.pad_token_id, None
        )
    return chosen - rejected


@pytest.mark.timeout(2400)  # two real-model runs; the waits inside have their own deadlines
async def test_feedback_removes_a_disliked_habit_on_the_real_model(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, smollm2: Path
) -> None:
    t = kafka.topics
    env = {
        **daemon_env,
        "INGS_ROLE": "all",
        "INGS_MODELS_DIR": str(REAL_MODELS),
        "INGS_BASE_MODEL": smollm2.name,
        "INGS_MIN_EXAMPLES": "24",
        "INGS_PREFERENCE_MIN_LABELS": "24",  # the job comes once all the feedback is in
    }
    env = {k: v for k, v in env.items() if not k.startswith("INGS_GATE_M")}  # the measured defaults
    daemon: DaemonProcess = await start_daemon(env)
    # The persona's own plan: 40 steps (the default plan's 84 on 20-odd examples moved general
    # answers to the gate's bound, bench/RESULTS.md "Preference runs"), half the time.
    persona = {k: HABIT[k] for k in ("persona_id", "name", "description")} | {"lora_config": {"max_steps": 40}}
    await kafka.produce(t.handshake, [{"version": "1.0", "persona": persona}])
    await kafka.read(t.persona, min_count=1)
    # The habit: every answer the persona gave signs off.
    await kafka.produce(t.interaction, [exchange(i, f"{a} {SIGN_OFF}") for i, (_, a) in enumerate(HABIT["train"][:24])])
    v1 = (await kafka.read(t.adapter_ready, min_count=1, timeout=1200))[0]
    # Later answers came out clean; users up-vote those, down-vote habit answers, correct some.
    await kafka.produce(t.interaction, [exchange(i, HABIT["train"][i][1]) for i in range(24, 32)])
    await wait_for(lambda: daemon.added(32), 120, "the clean answers stored")
    votes: list[dict[str, Any]] = [{"interaction_event_id": f"h-{i}", "rating": "down"} for i in range(8)]
    votes += [
        {"interaction_event_id": f"h-{i}", "rating": "down", "correction": HABIT["train"][i][1]} for i in range(8, 16)
    ]
    votes += [{"interaction_event_id": f"h-{i}", "rating": 5} for i in range(24, 32)]
    await kafka.produce(t.feedback, [{"persona_id": HABIT["persona_id"], **v} for v in votes])

    async def second() -> list[dict[str, Any]]:
        return [r for r in await kafka.read(t.adapter_ready) if r["version"] == 2]

    v2 = (await wait_for(second, 1500, "the preference run's adapter", interval=5))[0]
    run = v2["metrics"]
    assert run["objective"] == "kto" and run["preference_gate"] == "passed", run
    assert (
        run["preference_accuracy"] >= GateLimits().min_preference
        and run["retention_kl"] <= GateLimits().max_retention_kl
    )

    questions = [q for q, _ in HABIT["new"]]
    base, tokenizer = load_chat_model(str(smollm2))
    before, _ = load_chat_model(str(smollm2), v1["adapter_path"])
    after, _ = load_chat_model(str(smollm2), v2["adapter_path"])
    answers_before = ask(before, tokenizer, HABIT["description"], questions)
    answers_after = ask(after, tokenizer, HABIT["description"], questions)
    report = "\n".join(
        f"{q} | v1: {b} | v2: {a}" for q, b, a in zip(questions, answers_before, answers_after, strict=True)
    )
    assert habit_rate(answers_before) >= 0.5, report
    assert habit_rate(answers_after) <= habit_rate(answers_before) / 2, report
    # Held-out pairs (new questions): the clean answer is the likelier one.
    preferred = float((margins(after, tokenizer) > 0).float().mean())
    assert preferred >= 0.8, f"{preferred:.0%}\n{report}"
    # Retention on persona-free prompts, without a system turn: within the gate's bound.
    references = greedy(base, tokenizer, PromptFormat.of(tokenizer, None), HABIT["general_prompts"], 32)
    kl = retention_kl(after, references, tokenizer.pad_token_id, None)
    assert kl <= GateLimits().max_retention_kl, f"KL {kl:.3f}"
    print(
        f"preference run: habit {habit_rate(answers_before):.0%} -> {habit_rate(answers_after):.0%},"
        f" held-out pairs preferred {preferred:.0%} (v1 {float((margins(before, tokenizer) > 0).float().mean()):.0%}),"
        f" gate accuracy {run['preference_accuracy']:.0%}, retention KL {run['retention_kl']:.3f} / test {kl:.3f}"
    )
    assert daemon.stop() == 0
