"""Training throughput, side by side in one run: the daemon's LoRA run against Hugging Face
`Trainer` with peft as their documentation shows it, on the same base, examples, prompt
format, label masking, LoRA settings, batch size, epochs and learning rate.

Reports real (non-padding) tokens per second of each, measured around all the work after
the base model is loaded (`train_adapter`, which also scores its held-out split, and its
save; for `Trainer`: the peft wrapping, tokenising, `train()` and `save_model`), and the
ratio. The examples vary in length, as conversations do: padding is work that teaches
nothing, so only real tokens count. `Trainer` runs as its documentation shows, with its
defaults (no `group_by_length`).
Both run on the CPU in this process, one after the other, each from a fresh copy of the
base model. Appends a row to bench/RESULTS.md.

    python bench/trainer_vs_hf.py [N] [--epochs E] [--no-large] [--no-record]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from results import record_row

from ings_daemon.contract.events import LoraSpec, TrainExample, TrainJob
from ings_daemon.contract.examples import example_set
from ings_daemon.contract.ids import digest, utcnow
from ings_daemon.dev.tinymodel import make_tiny_model
from ings_daemon.trainer.data import IGNORE_INDEX, encode
from ings_daemon.trainer.gate import GateLimits
from ings_daemon.trainer.lora import BATCH_SIZE, train_adapter
from ings_daemon.trainer.targets import target_modules_for

TOPICS = ["the build", "a code review", "the release", "a flaky test", "the database", "the cache"]


def examples(n: int) -> list[TrainExample]:
    """Questions and answers of varied length (one to six sentences), as conversations are."""
    return [
        TrainExample(
            id=f"ex-{i}",
            input=f"What should I do about {TOPICS[i % len(TOPICS)]} on day {i}?",
            output=" ".join(
                f"Start with {TOPICS[(i * 5 + k) % len(TOPICS)]}, write down why, and check again on day {i + k + 1}."
                for k in range(1 + (i * 7) % 6)
            ),
        )
        for i in range(n)
    ]


def load(base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


def daemon_run(base: Path, data: list[TrainExample], spec: LoraSpec, out: Path) -> float:
    """Real tokens per second of the daemon's `train_adapter`."""
    model, tokenizer = load(base)
    job = TrainJob(
        job_id=digest("bench-vs-hf", str(len(data))),
        persona_id="did:nings:artificial:llm:bench:v1.0:0123456789ab",
        trigger="bench",
        base_model="bench-model",
        lora=spec,
        examples=example_set("memory", data),
        created_at=utcnow(),
    )
    started = time.perf_counter()
    result = train_adapter(
        model,
        tokenizer,
        job,
        data,
        out,
        previous_adapter=None,
        gate=GateLimits(enabled=False),
        on_progress=lambda *_: None,
    )
    return result.metrics.tokens / (time.perf_counter() - started)


def hf_run(base: Path, data: list[TrainExample], spec: LoraSpec, out: Path) -> float:
    """Real tokens per second of transformers' Trainer with a peft LoRA model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = load(base)
    started = time.perf_counter()  # as for the daemon: wrapping, tokenising, training, saving
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_modules_for(model),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    epochs = spec.epochs or 1  # main() always sets them: both runs make the same passes
    rows = []
    for example in data:
        encoded = encode(tokenizer, example, spec.max_seq_len)
        labels = [IGNORE_INDEX] * encoded.prompt_len + encoded.ids[encoded.prompt_len :]
        rows.append({"input_ids": encoded.ids, "attention_mask": [1] * len(encoded.ids), "labels": labels})
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH_SIZE,
        num_train_epochs=epochs,
        learning_rate=spec.learning_rate,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=min(10, max(1, (len(rows) // BATCH_SIZE * epochs) // 10)),
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )
    real_tokens = sum(len(r["input_ids"]) for r in rows) * epochs
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return real_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", nargs="?", type=int, default=128, help="examples (default 128)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-large", action="store_true", help="skip the ~20M-parameter Llama")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    data = examples(args.n)
    spec = LoraSpec(epochs=args.epochs, max_seq_len=128, learning_rate=1e-3)
    with tempfile.TemporaryDirectory(prefix="ings-bench-") as tmp:
        root = Path(tmp)
        bases = {"tiny": make_tiny_model(root / "tiny")}
        if not args.no_large:
            bases["llama-20m"] = make_tiny_model(
                root / "llama-20m", hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1376
            )
        results = []
        for name, base in bases.items():
            ours = daemon_run(base, data, spec, root / f"{name}-daemon")
            theirs = hf_run(base, data, spec, root / f"{name}-hf")
            results.append(f"{name}: daemon {ours:.0f} tok/s, Trainer {theirs:.0f} tok/s (x{ours / theirs:.2f})")
            print(
                f"{name:<10} {args.n} examples x {args.epochs} epochs, batch {BATCH_SIZE}: "
                f"daemon {ours:8.0f} real tokens/s   HF Trainer+peft {theirs:8.0f} real tokens/s   "
                f"ratio {ours / theirs:.2f}"
            )
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed here: SFTTrainer is not compared")
    if not args.no_record:
        record_row(Path(__file__), f"training N={args.n} epochs={args.epochs}", "; ".join(results))


if __name__ == "__main__":
    main()
