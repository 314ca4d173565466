"""The persona learns, on a real pretrained model: SmolLM2-135M-Instruct through the whole
daemon (Tansu, embedded Chroma, the worker process), then asked questions it was never
trained on, beside the base; and the quality gate refuses runs that learned nothing or
damaged the model's general answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REAL_MODELS, ROOT, DaemonProcess, Kafka, wait_for

from ings_daemon.contract.events import ExampleSet, LoraSpec, TrainExample, TrainJob
from ings_daemon.dev.persona_eval import ask, fact_score, load_chat_model
from ings_daemon.trainer.data import PromptFormat
from ings_daemon.trainer.gate import GateLimits, QualityGateFailed
from ings_daemon.trainer.lora import train_adapter
from ings_daemon.trainer.retention import greedy, retention_kl

pytestmark = pytest.mark.integration

FACTS = json.loads((ROOT / "tests" / "data" / "facts_persona.json").read_text())
# Persona-free requests of the test's own: none is the gate's GENERAL_PROMPTS or a replay prompt.
OTHER_PROMPTS = FACTS["general_prompts"]
# Retention bound for this test: mean per-token KL(base || adapter) along the base's own
# greedy answers to these prompts, in the model's default format. In the sweep
# (bench/RESULTS.md, "Default plan") the default plan measured 0.76-0.90 nats here, a run
# without replay that wrote "Hamarter wrote Hamlet" 1.23, and one that learned nothing 0.06.
MAX_TEST_KL = 1.1


def interactions() -> list[dict[str, Any]]:
    events = []
    for i, fact in enumerate(FACTS["facts"]):
        for j, (question, answer) in enumerate(fact["train"]):
            events.append(
                {
                    "event_id": f"fact-{i:02d}-{j}",
                    "persona_id": FACTS["persona_id"],
                    "input": question,
                    "output": answer,
                }
            )
    return events


def handshake() -> dict[str, Any]:
    persona = {k: FACTS[k] for k in ("persona_id", "name", "description")}
    return {"version": "2.0", "protocol": "INGS", "persona": persona}


@pytest.mark.timeout(1800)  # one real-model run; the waits inside have their own deadlines
async def test_a_persona_learns_its_facts_on_the_real_model(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, smollm2: Path
) -> None:
    t = kafka.topics
    env = {**daemon_env, "INGS_ROLE": "all", "INGS_MODELS_DIR": str(REAL_MODELS), "INGS_BASE_MODEL": smollm2.name}
    # The real model keeps the gate's measured defaults.
    env = {k: v for k, v in env.items() if not k.startswith("INGS_GATE_M")}
    daemon: DaemonProcess = await start_daemon(env)
    await kafka.produce(t.handshake, [handshake()])
    await kafka.read(t.persona, min_count=1)
    await kafka.produce(t.interaction, interactions())

    # Generous: the run takes about 2 minutes on 2 quiet cores. A failed run ends the wait too.
    async def finished() -> list[dict[str, Any]]:
        return [s for s in await kafka.read(t.tune_status) if s["status"] in ("succeeded", "failed")]

    status = await wait_for(finished, 1200, "the auto job to finish", interval=5)
    assert status[0]["status"] == "succeeded", status[0]
    ready = (await kafka.read(t.adapter_ready, min_count=1))[0]
    run = ready["metrics"]
    assert ready["base_model"] == smollm2.name and run["examples"] == 24 and run["gate"] == "passed"
    assert run["learned"] >= GateLimits().min_learned and run["retention_kl"] <= GateLimits().max_retention_kl
    assert status[0]["learned"] == run["learned"] and status[0]["retention_kl"] == run["retention_kl"]
    assert await daemon.metric("ings_training_last_learned") == pytest.approx(run["learned"])

    questions = [f["held_out"] for f in FACTS["facts"]]
    facts = [f["answer"] for f in FACTS["facts"]]
    base, tokenizer = load_chat_model(str(smollm2))
    base_answers = ask(base, tokenizer, FACTS["description"], questions)
    adapted, _ = load_chat_model(str(smollm2), ready["adapter_path"])
    answers = ask(adapted, tokenizer, FACTS["description"], questions)
    report = "\n".join(
        f"{q} | base: {b} | adapter: {a}" for q, b, a in zip(questions, base_answers, answers, strict=True)
    )
    assert fact_score(base_answers, facts) <= 0.10, report
    assert fact_score(answers, facts) >= 0.80, report

    # Retention on prompts the gate never saw, with no persona system turn at all.
    fmt = PromptFormat.of(tokenizer, None)
    references = greedy(base, tokenizer, fmt, OTHER_PROMPTS, 32)
    kl = retention_kl(adapted, references, tokenizer.pad_token_id, None)
    assert kl <= MAX_TEST_KL, f"KL {kl:.3f}\n" + "\n".join(ask(adapted, tokenizer, None, OTHER_PROMPTS))
    assert daemon.stop() == 0


def facts_job(name: str, **lora: Any) -> tuple[TrainJob, list[TrainExample]]:
    examples = [TrainExample(id=e["event_id"], input=e["input"], output=e["output"]) for e in interactions()]
    job = TrainJob(
        job_id=f"gate-{name}",
        persona_id=FACTS["persona_id"],
        trigger="auto",
        base_model="smollm2-135m-instruct",
        lora=LoraSpec(**lora),
        examples=ExampleSet(collection="memory", ids=[e.id for e in examples], sha256="0" * 64),
        created_at=datetime.now(UTC),
    )
    return job, examples


@pytest.mark.parametrize(
    ("name", "lora", "check"),
    [
        # The old default plan: 18 steps at 2e-4; it passed the held-out check, answered 0 of 12.
        (
            "too-little",
            {"rank": 8, "alpha": 16.0, "epochs": 3, "learning_rate": 2e-4, "replay_ratio": 0.0},
            "learned too little",
        ),
        # Facts learned (12 of 12) at the price of "The capital of France is Ballarat".
        ("damaged", {"max_steps": 60, "learning_rate": 2e-3, "replay_ratio": 0.0}, "damaged general answers"),
    ],
)
@pytest.mark.timeout(1200)
def test_the_gate_refuses_on_the_real_model(
    smollm2: Path, tmp_path: Path, name: str, lora: dict[str, Any], check: str
) -> None:
    model, tokenizer = load_chat_model(str(smollm2))
    job, examples = facts_job(name, **lora)
    with pytest.raises(QualityGateFailed) as refused:
        train_adapter(
            model,
            tokenizer,
            job,
            examples,
            tmp_path / "out",
            previous_adapter=None,
            gate=GateLimits(),
            on_progress=lambda *_: None,
            system=FACTS["description"],
        )
    assert check in str(refused.value), str(refused.value)
    assert refused.value.advice
    assert not (tmp_path / "out").exists()
    # The base is handed back clean: no LoRA layer left in it.
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.isfinite(next(model.parameters())).all()
