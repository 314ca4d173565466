"""Does feedback teach the persona? Feedback-shaped supervised training against the same with
the preference phase, side by side in one run, on the real model.

On SmolLM2-135M-Instruct, with the habit persona of the real-model test
(tests/data/habit_persona.json), every supervised phase 40 steps (the persona's own plan in
the test): v1 is trained on the persona's 24 answers, each ending in
the sign-off its users dislike. Then the feedback of the test: down-votes on 8 habit answers,
corrections of 8 more, up-votes on 8 clean later answers, of which the first N labels are
sent (round robin over the three kinds, `--labels`). For each N the next run trains on the
persona's 32 answers with that feedback:

- `sft`: the data shaped by feedback only (corrections replace, down-votes leave, up-votes
  count twice), no preference phase (run for the largest N only);
- `pref`: the same, then the preference phase (KTO) with its gate.

Reported for each: the habit's rate in greedy answers to 12 new questions (v1's beside it),
the share of those questions' held-out pairs where the clean answer is the likelier one
(log p(clean) > log p(clean + sign-off)), the phase's held-out accuracy and gate decision,
the retention KL the gate measured, and the run's time. Appends one row to bench/RESULTS.md.

    python bench/preference_bench.py [--labels 8,16,24] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results import record_row

from ings_daemon.contract.events import LoraSpec, TrainExample, TrainJob
from ings_daemon.contract.examples import example_set
from ings_daemon.contract.ids import utcnow
from ings_daemon.dev.persona_eval import ask, load_chat_model
from ings_daemon.models import SMOLLM2_SOURCE, import_model
from ings_daemon.trainer.data import PromptFormat, encode, end_of_turn_ids
from ings_daemon.trainer.gate import GateLimits
from ings_daemon.trainer.lora import train_adapter
from ings_daemon.trainer.preference import sequence_logps

ROOT = Path(__file__).resolve().parent.parent
HABIT = json.loads((ROOT / "tests" / "data" / "habit_persona.json").read_text())
SIGN_OFF = HABIT["habit"]
MODELS = Path.home() / ".cache" / "ings-daemon" / "models"
# Every run's supervised plan, as the real-model test's persona asks in its handshake.
STEPS = 40


def job(name: str, examples: list[TrainExample]) -> TrainJob:
    return TrainJob(
        job_id=name,
        persona_id=HABIT["persona_id"],
        trigger="auto",
        base_model="smollm2-135m-instruct",
        lora=LoraSpec(max_steps=STEPS),
        examples=example_set("memory", examples),
        created_at=utcnow(),
    )


def answers_with_feedback(n_labels: int) -> tuple[list[TrainExample], list[TrainExample]]:
    """(the persona's 32 answers with the first `n_labels` labels, the labelled ones)."""
    train = HABIT["train"]
    examples = [TrainExample(id=f"h-{i}", input=q, output=f"{a} {SIGN_OFF}") for i, (q, a) in enumerate(train[:24])]
    examples += [TrainExample(id=f"h-{i}", input=q, output=a) for i, (q, a) in enumerate(train[24:], 24)]
    kinds = [(i, {"feedback": "down"}) for i in range(8)]
    kinds += [(i, {"feedback": "down", "correction": train[i][1]}) for i in range(8, 16)]
    kinds += [(i, {"feedback": "up"}) for i in range(24, 32)]
    order = [kinds[k] for j in range(8) for k in (j, 8 + j, 16 + j)][:n_labels]
    for i, update in order:
        examples[i] = examples[i].model_copy(update=update)
    return examples, [examples[i] for i, _ in order]


def measure(base_path: str, adapter: Path) -> tuple[float, float]:
    """(habit rate in greedy answers to the new questions, share of their pairs preferred)."""
    model, tokenizer = load_chat_model(base_path, str(adapter))
    answers = ask(model, tokenizer, HABIT["description"], [q for q, _ in HABIT["new"]])
    rate = sum("happy gardening" in a.lower() for a in answers) / len(answers)
    fmt = PromptFormat.of(tokenizer, HABIT["description"])
    stops = end_of_turn_ids(tokenizer, model)

    def logps(suffix: str) -> torch.Tensor:
        items = [
            encode(tokenizer, TrainExample(id="", input=q, output=a + suffix), 512, fmt, stops) for q, a in HABIT["new"]
        ]
        with torch.no_grad():
            return sequence_logps(model, items, tokenizer.pad_token_id, None)

    return rate, float((logps("") > logps(f" {SIGN_OFF}")).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="8,16,24", help="label counts to run the preference phase with")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.labels.split(",")})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_path = str(import_model(SMOLLM2_SOURCE, MODELS).path)
    model, tokenizer = load_chat_model(base_path)
    out = Path(tempfile.mkdtemp(prefix="preference-bench-"))

    def run(name: str, examples: list[TrainExample], labelled: list[TrainExample]) -> dict[str, Any]:
        started = time.monotonic()
        result = train_adapter(
            model,
            tokenizer,
            job(name, examples),
            examples,
            out / name,
            previous_adapter=None,
            gate=GateLimits(),
            on_progress=lambda *a: None,
            system=HABIT["description"],
            preference=labelled,
        )
        rate, preferred = measure(base_path, out / name)
        m = result.metrics
        row = {"run": name, "habit": rate, "preferred": preferred, "objective": m.objective}
        row |= {"accuracy": m.preference_accuracy, "gate": m.preference_gate, "retention_kl": m.retention_kl}
        row |= {"seconds": round(time.monotonic() - started)}
        print(json.dumps(row), flush=True)
        return row

    habit = [
        TrainExample(id=f"h-{i}", input=q, output=f"{a} {SIGN_OFF}") for i, (q, a) in enumerate(HABIT["train"][:24])
    ]
    v1 = run("v1", habit, [])
    rows = [run(f"sft-{counts[-1]}", answers_with_feedback(counts[-1])[0], [])]
    rows += [run(f"pref-{n}", *answers_with_feedback(n)) for n in counts]

    def cell(r: dict[str, Any]) -> str:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.0%}"
        return (
            f"{r['run']}: habit {r['habit']:.0%}, pairs preferred {r['preferred']:.0%}, {r['objective']}"
            f" (phase accuracy {acc}, {r['gate']}), retention KL {r['retention_kl']:.3f}, {r['seconds']} s"
        )

    lines = [f"v1 (habit on every answer): habit {v1['habit']:.0%}, pairs preferred {v1['preferred']:.0%}"]
    lines += [cell(r) for r in rows]
    print("\n".join(lines))
    if not args.no_record:
        record_row(Path(__file__), "preference: SmolLM2-135M habit persona, feedback -> KTO", "; ".join(lines))


if __name__ == "__main__":
    main()
