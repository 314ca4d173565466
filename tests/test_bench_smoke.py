"""The benchmarks still run: each one with a tiny N, nothing recorded, figures not judged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("script", "expect"),
    [("embed_bench.py", "ratio auto/float32"), ("ingest_bench.py", "ratio to bare")],
)
def test_benchmark_runs(script: str, expect: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "64", "--no-record"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert expect in done.stdout
