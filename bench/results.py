"""Appends one benchmark result to bench/RESULTS.md with what it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import psutil

HEADER = "| date (UTC) | commit | CPU | cores | memory | benchmark | result |\n|---|---|---|---|---|---|---|\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record_row(script: Path, benchmark: str, result: str) -> None:
    """Append `benchmark` and `result` to bench/RESULTS.md (created with a header if new)."""
    repo = script.resolve().parent.parent
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=False
    ).stdout.strip()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    row = (
        f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {commit or '?'} | {cpu_model()} | {cores} | {memory} "
        f"| {benchmark} | {result} |\n"
    )
    path = repo / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nOne row per run, appended by the scripts in bench/.\n\n" + HEADER)
    with path.open("a") as out:
        out.write(row)
