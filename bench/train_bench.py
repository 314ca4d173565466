"""Training benchmark: throughput, cold vs warm worker latency, worker memory over runs.

Run from the repository root:  python -m bench.train_bench [--runs 20] [--no-large]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from ings_daemon.contract.events import LoraSpec, TrainExample, TrainJob
from ings_daemon.contract.examples import example_set
from ings_daemon.contract.ids import digest, utcnow
from ings_daemon.dev.tinymodel import make_tiny_model
from ings_daemon.trainer.gate import GateLimits
from ings_daemon.trainer.worker import TrainingWorker, WorkOutcome, WorkRequest

PERSONA = "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1"
TOPICS = ["the build", "a code review", "the release", "a flaky test", "the database", "the cache",
          "an outage", "the roadmap", "a new hire", "the API"]  # fmt: skip


def make_job(n: int, tag: str, epochs: int = 2, max_seq_len: int = 128) -> tuple[TrainJob, list[TrainExample]]:
    examples = [
        TrainExample(
            id=f"{tag}-{i}",
            input=f"What should I do about {TOPICS[i % len(TOPICS)]} on day {i}?",
            output=f"Start with {TOPICS[(i * 3) % len(TOPICS)]}, write down why, and check on day {i + 1}.",
        )
        for i in range(n)
    ]
    job = TrainJob(
        job_id=digest("bench", tag, str(n)),
        persona_id=PERSONA,
        trigger="bench",
        base_model="bench-model",
        lora=LoraSpec(epochs=epochs, max_seq_len=max_seq_len, learning_rate=1e-3),
        examples=example_set("memory", examples),
        created_at=utcnow(),
    )
    return job, examples


async def _no_progress(step: int, total: int, loss: float) -> None:
    return None


class Runner:
    def __init__(self, worker: TrainingWorker, scratch: Path) -> None:
        self.worker = worker
        self.scratch = scratch
        self.count = 0

    async def run(self, base: Path, made: tuple[TrainJob, list[TrainExample]]) -> tuple[WorkOutcome, float]:
        job, examples = made
        self.count += 1
        out = self.scratch / f"run-{self.count}"
        out.mkdir()
        request = WorkRequest(
            job=job, examples=examples, base_model_path=str(base), tmp_dir=out, gate=GateLimits(enabled=False)
        )
        started = time.perf_counter()
        outcome = await self.worker.run(request, _no_progress)
        elapsed = time.perf_counter() - started
        if not outcome.ok:
            raise SystemExit(f"bench run failed: {outcome.reason}")
        return outcome, elapsed


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            total += _numel(fh.get_slice(key).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _throughput_line(name: str, params: int, outcome: WorkOutcome) -> str:
    m = outcome.metrics
    assert m is not None
    rate = m.tokens / m.duration_s if m.duration_s else float("nan")
    return (
        f"  {name:<12} {params / 1e6:6.2f}M params  {m.examples:4d} examples  {m.steps:4d} steps  "
        f"{m.tokens:6d} tokens in {m.duration_s:6.2f}s  = {rate:8.0f} tokens/s  "
        f"(loss {m.train_loss_first:.3f} -> {m.train_loss_last:.3f})"
    )


async def main(runs: int, large: bool) -> None:
    import torch

    from ings_daemon.trainer.targets import autocast_dtype, resolve_device

    dev = resolve_device("auto")
    # Other processes on a small machine skew every figure below; the load says how much.
    print(f"device: {dev}  autocast: {autocast_dtype(dev)}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ings-bench-") as tmp:
        root = Path(tmp)
        tiny = make_tiny_model(root / "tiny")
        bigger = None
        if large:
            bigger = make_tiny_model(
                root / "llama-20m",
                hidden_size=512,
                num_hidden_layers=6,
                num_attention_heads=8,
                intermediate_size=1376,
            )
        scratch = root / "runs"
        scratch.mkdir()

        # Latency: a fresh worker (spawn + imports + base load), then the same base warm.
        worker = TrainingWorker()
        try:
            runner = Runner(worker, scratch)
            cold, cold_s = await runner.run(tiny, make_job(16, "cold", epochs=1))
            warm, warm_s = await runner.run(tiny, make_job(16, "warm", epochs=1))
            print("\nrequest -> outcome, tiny model, 16 examples x 1 epoch:")
            assert cold.metrics is not None and warm.metrics is not None
            rows = [
                ("", "cold worker", "warm worker"),
                ("request -> outcome (s)", f"{cold_s:.2f}", f"{warm_s:.2f}"),
                ("base_model_loaded_s", f"{cold.base_model_loaded_s:.3f}", f"{warm.base_model_loaded_s:.3f}"),
                ("training duration_s", f"{cold.metrics.duration_s:.2f}", f"{warm.metrics.duration_s:.2f}"),
            ]
            for label, left, right in rows:
                print(f"  {label:<28}{left:>14}{right:>14}")

            print("\ntraining throughput (LoRA r=8 on all projections, batch 4, max_seq_len 128):")
            outcome, _ = await runner.run(tiny, make_job(128, "tput-tiny", epochs=2))
            print(_throughput_line("tiny", _params(tiny), outcome))
            rss: list[int] = []
            for i in range(runs):
                outcome, _ = await runner.run(tiny, make_job(16, f"rss-{i}", epochs=1))
                rss.append(outcome.worker_rss_bytes)
            mib = [r / 2**20 for r in rss]
            print(f"\nworker RSS over {runs} consecutive runs on the tiny model (MiB):")
            print(f"  first {mib[0]:.1f}  max {max(mib):.1f}  last {mib[-1]:.1f}  "
                  f"(growth after first: {max(mib) - mib[0]:+.1f})")  # fmt: skip
            print("  per run: " + " ".join(f"{m:.0f}" for m in mib))

            if bigger is not None:
                started = time.perf_counter()
                outcome, _ = await runner.run(bigger, make_job(64, "tput-20m", epochs=2))
                print("\ntraining throughput, larger model (same job shape, 64 examples):")
                print(_throughput_line("llama-20m", _params(bigger), outcome))
                print(f"  (llama-20m request -> outcome {time.perf_counter() - started:.2f}s, "
                      f"of which base load {outcome.base_model_loaded_s:.2f}s)")  # fmt: skip
                swap, swap_s = await runner.run(tiny, make_job(16, "swap", epochs=1))
                print(f"\nrequest -> outcome back on the tiny model (warm worker, cold base after a swap): "
                      f"{swap_s:.2f}s, of which base load {swap.base_model_loaded_s:.3f}s")  # fmt: skip
        finally:
            await worker.close()
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-large", action="store_true", help="skip the ~20M parameter model")
    args = parser.parse_args()
    asyncio.run(main(args.runs, not args.no_large))
