"""The image runs the system: an ingest and a trainer container (host networking, so all
traffic stays on loopback) against a Tansu broker and a `chroma run` server on the host,
sharing one adapters volume."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TECHLEAD, HttpEndpoint, Kafka, adapter_generates, example_events, wait_for

from containers.conftest import CONTAINER_TESTS, Images
from containers.engine import docker, inspect, logs, wait_healthy
from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.dev.stack import free_port

pytestmark = CONTAINER_TESTS

GRACE_S = 45  # docker-compose.yml's stop_grace_period
STOPPED_WITHIN_S = 15


@pytest.fixture
def volumes() -> Iterator[tuple[str, str]]:
    """Fresh adapters and models volumes, removed afterwards with any container using them."""
    tag = uuid.uuid4().hex[:8]
    names = (f"ings-test-adapters-{tag}", f"ings-test-models-{tag}")
    for name in names:
        docker("volume", "create", name)
    yield names
    users = docker("ps", "-aq", "--filter", f"volume={names[0]}").split()
    if users:
        docker("rm", "-f", *users)
    docker("volume", "rm", *names)


def role_container(images: Images, role: str, env: dict[str, str], adapters: str, models: str) -> str:
    """Start one role detached, as a user would: `docker run` of the image, settings as -e."""
    settings = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    return docker(
        "run",
        "-d",
        "--name",
        f"{adapters}-{role}",
        "--network",
        "host",
        "-v",
        f"{adapters}:/data/adapters",
        "-v",
        f"{models}:/data/models:ro",
        *settings,
        "-e",
        f"INGS_ROLE={role}",
        images.daemon,
    ).strip()


def stop(container: str) -> tuple[int, float]:
    """`docker stop` with the compose file's grace period: (exit code, seconds taken)."""
    started = time.monotonic()
    docker("stop", "-t", str(GRACE_S), container, timeout=GRACE_S + 30)
    return inspect("container", container)["State"]["ExitCode"], time.monotonic() - started


async def test_ingest_and_trainer_containers_turn_the_examples_into_an_adapter(
    images: Images,
    kafka: Kafka,
    daemon_env: dict[str, str],
    chroma_server: ChromaServer,
    volumes: tuple[str, str],
) -> None:
    adapters, models = volumes
    # The base model is made inside the image too, into the models volume.
    docker(
        "run", "--rm", "-v", f"{models}:/data/models", images.daemon,
        "ings-daemon", "make-tiny-model", "/data/models/tiny-llama", timeout=180,
    )  # fmt: skip
    env = {key: value for key, value in daemon_env.items() if key.startswith(("KAFKA_", "INGS_"))}
    env.update({"INGS_ADAPTER_DIR": "/data/adapters", "INGS_MODELS_DIR": "/data/models"})
    env.update({"CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(chroma_server.port)})
    ports = {"ingest": free_port(), "trainer": free_port()}
    containers = {
        role: role_container(images, role, {**env, "INGS_HTTP_PORT": str(port)}, adapters, models)
        for role, port in ports.items()
    }

    t = kafka.topics
    await kafka.produce(t.handshake, example_events("personas/techlead_ings.json"))
    await kafka.produce(t.interaction, example_events("interactions/techlead.jsonl")[:10])
    try:
        ready = (await kafka.read(t.adapter_ready, min_count=1, timeout=300))[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(containers['ingest'])}\n{logs(containers['trainer'])}") from None
    assert ready["persona_id"] == TECHLEAD and ready["version"] == 1 and ready["metrics"]["gate"] == "passed"

    ingest = HttpEndpoint(ports["ingest"])
    await wait_for(lambda: ingest.added(10), 60, "ten memories in the Chroma server")
    for container in containers.values():
        await asyncio.to_thread(wait_healthy, container, 150)

    # The adapter is in the shared volume, loads with peft on the host, and every file there
    # belongs to the image's user.
    adapters_dir = Path(inspect("volume", adapters)["Mountpoint"])
    models_dir = Path(inspect("volume", models)["Mountpoint"])
    adapter = adapters_dir / Path(ready["adapter_path"]).relative_to("/data/adapters")
    assert adapter_generates(models_dir / "tiny-llama", adapter) > 0
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [adapters_dir, *adapters_dir.rglob("*")]}
    assert owners == {(10001, 10001)}

    # `docker stop` in the middle of a training run: the daemon (PID 1, no init) gets
    # SIGTERM, stops the run rather than waiting for it, and exits 0; then the idle ingest.
    await kafka.produce(t.tune_request, [long_tune_request()])
    trainer = HttpEndpoint(ports["trainer"])

    async def training() -> bool:
        return await trainer.metric("ings_training_in_progress") == 1

    await wait_for(training, 120, "the tune request's run to start")
    for role in ("trainer", "ingest"):
        code, seconds = await asyncio.to_thread(stop, containers[role])
        assert code == 0, f"{role} exited {code} on docker stop:\n{logs(containers[role])}"
        # Well under INGS_SHUTDOWN_TIMEOUT_S (30 s), which waiting for the run would take.
        assert seconds < STOPPED_WITHIN_S, f"{role} took {seconds:.0f}s to stop:\n{logs(containers[role])}"
    # The stopped run left no version and no temporary folder behind.
    assert [v.name for v in adapter.parent.glob("v*")] == ["v0001"]
    assert not list((adapters_dir / ".tmp").iterdir())


def long_tune_request() -> dict[str, object]:
    """A tune request that would train for minutes: 200 examples, 100 epochs."""
    examples = [{"input": f"Question {i}: what next?", "output": f"Answer {i}: one step."} for i in range(200)]
    return {
        "request_id": "long-run",
        "persona_id": TECHLEAD,
        "training_data": examples,
        "lora_config": {"model_name": "tiny-llama", "epochs": 100},
    }
