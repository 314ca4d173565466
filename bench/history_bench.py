"""Does a long history cost more? The daemon's peak memory and time to its train jobs, side
by side for a persona with a short history and one with a long one, in one run.

For each history size H: a fresh embedded Chroma is seeded with H short memories of one
persona and 600 long ones (about 4 KB each) of another, none trained yet, as a daemon with
no base model would have left them. Then `ings-daemon run` (ingest role) starts on a fresh
Tansu broker with a base model and `INGS_MIN_EXAMPLES=10`: it rebuilds its backlog, must
publish one auto job per persona, then ingests 200 new interactions and publishes the next
job. Reported: seconds from ready to the first two jobs, and the daemon's peak RSS (VmHWM).

The seeded vectors are random unit vectors (embedding 20,000 texts would take minutes and
measure the model, not the history); everything else is what the daemon writes.

    python bench/history_bench.py [--sizes 1000,20000] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ingest_bench import daemon_running, events, produce, wait_until
from results import record_row

from ings_daemon.config import Settings
from ings_daemon.contract.events import Interaction
from ings_daemon.contract.examples import example_text
from ings_daemon.contract.ids import interaction_id
from ings_daemon.dev.stack import Broker
from ings_daemon.dev.tinymodel import make_tiny_model
from ings_daemon.ingest.handlers import interaction_metadata
from ings_daemon.runtime.decode import Incoming
from ings_daemon.storage.chroma import Collections, Record, memory_of

SHORT = "did:nings:artificial:llm:history:v1.0:00000000000a"
LONG = "did:nings:artificial:llm:history:v1.0:00000000000b"
JOBS = 'ings_train_jobs_published_total{trigger="auto"}'


@dataclass
class Coordinates:
    """Where a seeded record would have come from (the fields the runtime's Record has)."""

    topic: str = "ings.interaction"
    partition: int = 0
    offset: int = 0
    key: bytes | None = None
    value: bytes | None = None


async def seed(chroma_path: str, persona: str, n: int, text_chars: int) -> None:
    collections = Collections(Settings(chromadb_path=Path(chroma_path)))
    rng = np.random.default_rng(n)
    for start in range(0, n, 1000):
        records = []
        for i in range(start, min(n, start + 1000)):
            filler = ("and then the next step, " * (text_chars // 24 + 1))[:text_chars]
            event = Interaction(persona_id=persona, input=f"Question {i}: {filler}", output=f"Answer {i}: {filler}")
            item = Incoming(Coordinates(offset=i), event, f"seed-{i}", {})
            vector = rng.normal(size=384)
            records.append(
                Record(
                    id=interaction_id(persona, item.event_id),
                    document=example_text(event.input, event.output),
                    metadata=interaction_metadata(item),
                    embedding=[float(x) for x in vector / np.linalg.norm(vector)],
                )
            )
        await collections.add(memory_of(persona), records)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(history: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        asyncio.run(seed(f"{tmp}/chroma", SHORT, history, 40))
        asyncio.run(seed(f"{tmp}/chroma", LONG, 600, 2000))
        make_tiny_model(Path(tmp) / "models" / "tiny-llama")
        overrides = {
            "INGS_ROLE": "ingest",
            "INGS_MODELS_DIR": f"{tmp}/models",
            "INGS_BASE_MODEL": "tiny-llama",
            "INGS_MIN_EXAMPLES": "10",
        }
        with daemon_running(broker, tmp, overrides) as port:
            started = time.perf_counter()
            wait_until(port, JOBS, 2, 600, every=0.5)
            to_jobs = time.perf_counter() - started
            later = [{**e, "persona_id": SHORT, "event_id": f"later-{i}"} for i, e in enumerate(events(200))]
            asyncio.run(produce(broker.bootstrap, "ings.interaction", later))
            wait_until(port, JOBS, 3, 600, every=0.5)
            return {"to_jobs_s": to_jobs, "peak_mib": peak_rss_mib(_daemon_pid(port))}


def _daemon_pid(port: int) -> int:
    """The pid of the process listening on `port`: the daemon."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return int(conn.pid)
    raise SystemExit(f"no process listens on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,20000", help="history sizes, comma-separated")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    found = {h: run(h) for h in sizes}
    small, large = found[sizes[0]], found[sizes[-1]]
    print(f"cores: {os.cpu_count()}; a second persona with 600 long memories alongside")
    for h, f in found.items():
        print(f"history {h:>6}: first two jobs {f['to_jobs_s']:6.1f} s after ready, peak RSS {f['peak_mib']:7.0f} MiB")
    ratio = large["peak_mib"] / small["peak_mib"]
    print(f"peak RSS ratio {sizes[-1]} / {sizes[0]}: {ratio:.2f}")
    if not args.no_record:
        record_row(
            Path(__file__),
            f"history {sizes[0]} vs {sizes[-1]}",
            "; ".join(
                f"{h}: jobs in {f['to_jobs_s']:.1f} s, peak RSS {f['peak_mib']:.0f} MiB" for h, f in found.items()
            )
            + f"; ratio {ratio:.2f}",
        )


if __name__ == "__main__":
    main()
