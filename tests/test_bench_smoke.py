"""The benchmarks still run: each one with a tiny N, nothing recorded, figures not judged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


SMALL = ["--queries", "10", "--interactions", "64", "--busy", "64"]


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (["embed_bench.py", "64"], "ratio auto/float32"),
        (["ingest_bench.py", "64", "--texts", "long"], "where the float32 daemon's busy time went"),
        (["recall_bench.py", "400", "8", "--queries", "20"], "p50 ratio"),
        (["buckets_bench.py", "--counts", "4", "--personas", "40", "--memories", "2", "--queries", "10"], "ratio"),
        (["trainer_vs_hf.py", "8", "--epochs", "1", "--no-large"], "ratio"),
        (["history_bench.py", "--sizes", "100,300"], "peak RSS ratio"),
        (["soak_bench.py", "--minutes", "0.4", "--warmup", "0.1", "--rate", "2"], "RSS after warm-up"),
        (["personas_bench.py", "--personas", "100", "--memories", "2", "--steps", "100", *SMALL], "ratio"),
    ],
)
@pytest.mark.timeout(900)  # a busy machine: the deadline is for a hang, not a speed check
def test_benchmark_runs(command: list[str], expect: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / command[0]), *command[1:], "--no-record"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert expect in done.stdout
