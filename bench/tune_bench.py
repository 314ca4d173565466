"""Tune request -> adapter-ready through the real daemon (role all), side by side:

- cold: the first request starts the worker process and loads the base model;
- warm: the next requests on the same base reuse the loaded model.

Also prints training tokens/s from the adapter-ready metrics.

    python bench/tune_bench.py [N_WARM]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from ingest_bench import daemon_running, produce, wait_until

from ings_daemon.dev.stack import Broker
from ings_daemon.dev.tinymodel import make_tiny_model

PERSONA = "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tune_request(request_id: str) -> dict[str, Any]:
    body = json.loads((EXAMPLES / "tune-requests/techlead_tune.json").read_text())
    return {**body, "request_id": request_id}


async def time_to_ready(bootstrap: str, request_id: str) -> tuple[float, dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        "ings.adapter-ready", bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        started = time.perf_counter()
        await produce(bootstrap, "ings.tune-request", [tune_request(request_id)])
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    event = json.loads(r.value)
                    if event["trigger"] == request_id:
                        return time.perf_counter() - started, event
    finally:
        await consumer.stop()


def main() -> None:
    warm_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        make_tiny_model(Path(tmp) / "models" / "tiny-llama")
        models = {"INGS_ADAPTER_DIR": f"{tmp}/adapters", "INGS_MODELS_DIR": f"{tmp}/models", "INGS_ROLE": "all"}
        with daemon_running(broker, tmp, {**models, "INGS_BASE_MODEL": "tiny-llama"}) as port:
            handshake = json.loads((EXAMPLES / "personas/techlead_ings.json").read_text())
            asyncio.run(produce(broker.bootstrap, "ings.handshake", [handshake]))
            wait_until(port, "ings_personas_registered_total", 1, 60)
            cold, event = asyncio.run(time_to_ready(broker.bootstrap, "cold"))
            warm = [asyncio.run(time_to_ready(broker.bootstrap, f"warm-{i}")) for i in range(warm_runs)]

    def rate(e: dict[str, Any]) -> float:
        return float(e["metrics"]["tokens"]) / max(float(e["metrics"]["duration_s"]), 1e-9)

    warm_s = sorted(w for w, _ in warm)
    print(
        f"tiny-llama, {event['metrics']['examples']} examples x {event['lora']['epochs']} epochs, "
        f"rank {event['lora']['rank']}, cores: {os.cpu_count()}"
    )
    print(f"tune request -> adapter-ready, cold base model: {cold:7.2f} s")
    print(f"tune request -> adapter-ready, warm base model: {warm_s[len(warm_s) // 2]:7.2f} s (median of {warm_runs})")
    print(f"cold / warm ratio:                              {cold / warm_s[len(warm_s) // 2]:7.2f}")
    print(
        f"training tokens/s (adapter-ready metrics):       cold {rate(event):.0f}, "
        f"warm {sorted(rate(e) for _, e in warm)[len(warm) // 2]:.0f}"
    )


if __name__ == "__main__":
    main()
