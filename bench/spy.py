"""The profile split of bench/ingest_bench.py: py-spy samples of the daemon's threads,
sorted into what they were doing (the model, the Chroma client, decoding, the event loop...)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Walking a sample from its innermost frame outwards, the first frame that names one of
# these decides where the sample goes; generic frames (pydantic, json, typing) count for
# whoever called them.
PROFILE_PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("model (sentence-transformers, torch)", ("sentence_transformers/", "torch/", "transformers/", "tokenizers/")),
    ("Chroma client (HTTP, serialisation)", ("chromadb/",)),
    ("logging", ("logging/__init__", "ings_daemon/runtime/logs.py")),
    ("metrics (prometheus-client)", ("prometheus_client/",)),
    ("HTTP server (/metrics scrapes)", ("aiohttp/",)),
    ("Kafka client (fetch, commit, produce)", ("aiokafka/", "kafka/")),
    ("decode and validation", ("ings_daemon/runtime/decode.py",)),
    ("metadata flattening", ("ings_daemon/storage/metadata.py", "interaction_metadata")),
    ("id derivation", ("ings_daemon/contract/ids.py",)),
    ("redaction", ("ings_daemon/ingest/redact.py", "ings_daemon/ingest/privacy.py")),
    ("embedding hand-off (vectors to lists)", ("ings_daemon/storage/embedder.py",)),
    ("other daemon code", ("ings_daemon/",)),
    ("event loop (asyncio)", ("asyncio/", "selectors.py")),
]


@contextlib.contextmanager
def profiled(pids: dict[str, int], out: Path) -> Iterator[None]:
    """py-spy sampling the busy threads of process `pids["consumer"]` 100 times a second,
    without pausing it, until the block ends; writes collapsed stacks to `out`. py-spy's own
    pid is added to `pids` as `py-spy`, so its CPU can be counted."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SystemExit("py-spy is not installed (scripts/test.sh installs it); or run with --no-profile")
    command = [str(spy), "record", "--pid", str(pids["consumer"]), "--format", "raw", "--output", str(out)]
    sampler = subprocess.Popen(
        [*command, "--nonblocking", "--rate", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pids["py-spy"] = sampler.pid
    try:
        yield
    finally:
        sampler.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        sampler.wait(60)


def profile_split(stacks: Path) -> dict[str, float]:
    """Share of the sampled busy time per part of PROFILE_PARTS (plus `other`)."""
    counts: dict[str, float] = {}
    if not stacks.exists():
        return counts
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        part = "other (interpreter, libraries)"
        for frame in reversed(frames.split(";")):
            found = next((name for name, marks in PROFILE_PARTS if any(m in frame for m in marks)), None)
            if found is not None:
                part = found
                break
        counts[part] = counts.get(part, 0) + int(count)
    total = sum(counts.values()) or 1.0
    return {name: c / total for name, c in sorted(counts.items(), key=lambda kv: -kv[1])}
