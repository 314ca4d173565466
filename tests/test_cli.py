"""The commands a user types: the embedded quick start, send and tail, and a third-party
(librdkafka) producer feeding the daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import EXAMPLES, TECHLEAD, Kafka, chroma_records, wait_for
from vllm_server import VllmProcess

from ings_daemon.contract.serving import served_name
from ings_daemon.dev.stack import free_port

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ings_daemon", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.timeout(1800)  # two real-model runs; the waits inside have their own deadlines
def test_dev_with_examples_trains_the_real_model_and_its_adapter_knows_the_facts(
    tmp_path: Path, smollm2: Path, vllm: VllmProcess
) -> None:
    """The quick start: `dev --examples` on SmolLM2-135M-Instruct. The example persona's auto
    adapter is announced and then asked the held-out questions of examples/eval (none is
    in its interactions); it states most facts where the base states almost none. With a
    vLLM server named (the README's "talk to the persona"), each adapter is served and
    the persona answers through the OpenAI API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CHROMADB_", "INGS_"))}
    env.update({"INGS_HTTP_PORT": str(free_port()), "KAFKA_SESSION_TIMEOUT_MS": "6000", "PYTHONUNBUFFERED": "1"})
    env["INGS_VLLM_URLS"] = vllm.url
    # Left over from a second shell's export: dev uses its own broker all the same.
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    kafka_port = free_port()
    data = tmp_path / "data"
    # The import is the first thing dev does on a fresh machine; here the session's copy is
    # linked in, since the import itself is tested on its own (test_models.py).
    (data / "models").mkdir(parents=True)
    (data / "models" / smollm2.name).symlink_to(smollm2)
    stderr = (tmp_path / "dev.err").open("w")
    command = ["dev", "--data", str(data), "--kafka-port", str(kafka_port), "--examples", str(EXAMPLES)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ings_daemon", *command],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    # Generous: two real-model runs (the tune request's and the auto job's) of about two
    # minutes each on 2 quiet cores, in either order.
    deadline = time.monotonic() + 1500

    def auto_report() -> re.Match[str] | None:
        auto = [
            e["event"]["version"]
            for e in seen
            if e["topic"] == "ings.adapter-ready" and e["event"]["trigger"] == "auto"
        ]
        text = (tmp_path / "dev.err").read_text()
        return re.search(rf"facts stated: base (\d+) of 8, v{auto[0]} (\d+) of 8", text) if auto else None

    try:
        while (found := auto_report()) is None:
            assert time.monotonic() < deadline, f"no answers from the auto adapter; saw {seen}"
            line = proc.stdout.readline()
            assert line, f"dev exited early:\n{(tmp_path / 'dev.err').read_text()[-3000:]}"
            seen.append(json.loads(line))
            event = seen[-1]["event"]
            failed = seen[-1]["topic"] == "ings.tune-status" and event["status"] == "failed"
            assert not (failed and event["request_id"] is None), f"the auto job failed: {event}"
        auto = next(e["event"] for e in seen if e["topic"] == "ings.adapter-ready" and e["event"]["trigger"] == "auto")
        name = served_name(TECHLEAD, auto["version"])
        while not any(e["topic"] == "ings.served-model" and e["event"]["served_name"] == name for e in seen):
            assert time.monotonic() < deadline, f"{name} was not served; saw {seen}"
            seen.append(json.loads(proc.stdout.readline()))
        assert name in vllm.models()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{env['INGS_HTTP_PORT']}/v1", api_key="-", max_retries=0)
        question = [{"role": "user", "content": "What is the name of your team?"}]
        answer = client.chat.completions.create(model=TECHLEAD, messages=question, max_tokens=40, temperature=0)  # type: ignore[arg-type]
        print(f"\nTechLead through the daemon and vLLM: {answer.choices[0].message.content!r}")
        assert answer.model == TECHLEAD and answer.choices[0].message.content
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "dev.err").read_text()
    base_facts, adapter_facts = int(found[1]), int(found[2])
    # The strict figure (80% of held-out questions) is test_real_model's; here the quick start
    # must show a clear majority where the base has none (6 of 8 measured, 7 in another split).
    assert base_facts <= 1 and adapter_facts >= 5, log[-4000:]
    ready = next(e["event"] for e in seen if e["topic"] == "ings.adapter-ready" and e["event"]["trigger"] == "auto")
    assert ready["persona_id"] == TECHLEAD and Path(ready["adapter_path"]).is_dir()
    assert ready["base_model"] == "smollm2-135m-instruct" and ready["metrics"]["gate"] == "passed"
    assert any(e["topic"] == "ings.recall-result" for e in seen)
    assert '"event": "stopped"' in log and '"exit_code": 0' in log and "Traceback" not in log
    assert f"\nexport KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}\n" in log  # a line to paste


def test_dev_with_the_tiny_model_says_when_no_real_model_is_wanted(tmp_path: Path) -> None:
    """`dev --base tiny` makes the tiny random model instead (seconds, learns nothing)."""
    from ings_daemon.dev.stack import dev_base_model

    assert dev_base_model(tmp_path / "models", "tiny") == "tiny-llama"
    assert (tmp_path / "models" / "tiny-llama" / "config.json").is_file()


async def test_send_and_tail_and_a_librdkafka_producer(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    t = kafka.topics
    daemon = await start_daemon(daemon_env)
    sent = cli(
        "send",
        str(EXAMPLES / "personas/techlead_ings.json"),
        str(EXAMPLES / "interactions/techlead.jsonl"),
        "--topic",
        "handshake",
        env=daemon_env,
    )
    assert sent.returncode == 0 and "sent 13 events" in sent.stderr  # the JSONL lines are no handshakes
    sent = cli("send", str(EXAMPLES / "interactions/techlead.jsonl"), "--topic", "interaction", env=daemon_env)
    assert sent.returncode == 0 and "sent 12 events" in sent.stderr

    # librdkafka's default partitioner is not Kafka's murmur2; docs/events.md says to pick it.
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap, "partitioner": "murmur2_random", "enable.idempotence": False}
    )
    for i in range(5):
        event = {
            "event_id": f"rdkafka-{i}",
            "persona_id": TECHLEAD,
            "input": f"Is {i} a good team size?",
            "output": f"{i + 3} people is workable if they share one backlog, answer {i}.",
        }
        producer.produce(t.interaction, json.dumps(event).encode(), key=TECHLEAD.encode())
    assert producer.flush(30) == 0

    await wait_for(lambda: daemon.added(17), 60, "12 + 5 records")
    tail = cli("tail", "persona", "--from-beginning", "--count", "1", "--timeout", "30", env=daemon_env)
    assert tail.returncode == 0
    persona = json.loads(tail.stdout.splitlines()[0])
    assert persona["topic"] == t.persona and persona["event"]["persona_id"] == TECHLEAD
    letters = await kafka.read(t.dlq, min_count=12)  # the interactions sent as handshakes
    assert {d["error_type"] for d in letters} == {"invalid_event"} and len(letters) == 12
    assert daemon.stop() == 0
    stored = {r["event_id"] for r in chroma_records(tmp_path / "chroma")}
    assert {f"rdkafka-{i}" for i in range(5)} <= stored
    # Same partition as aiokafka's keyed events: one consumer owns the persona.
    assert len(await kafka.highwaters(t.interaction)) == 3
    counts = {p: hw for p, hw in (await kafka.highwaters(t.interaction)).items() if hw}
    assert list(counts.values()) == [17]
