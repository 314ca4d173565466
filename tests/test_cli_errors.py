"""Errors a person can act on: each bad input, setting or unreachable service is one line
naming the file, topic or setting, a non-zero exit and no traceback; `tail` rides out a
broker that goes away and stops quietly on Ctrl-C; an unreachable Chroma is named at start."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, DaemonProcess, Kafka, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ings_daemon.cli import build_parser, read_events, resolve_topic
from ings_daemon.config import Topics
from ings_daemon.dev.stack import Broker, free_port
from ings_daemon.errors import UserError

SHORT_NAMES = "handshake, interaction, tune-request, recall-request, forget, persona, recall-result, train-job, "
SHORT_NAMES += (
    "tune-status, adapter-ready, forget-result, adapter-retired, served-model, feedback, feedback-result, dlq"
)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CHROMADB_", "INGS_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


def closed_port_env(**extra: str) -> dict[str, str]:
    """Settings whose broker address is a loopback port nothing listens on."""
    return base_env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", **extra)


def cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ings_daemon", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=90
    )


def one_line(result: subprocess.CompletedProcess[str], code: int, *named: str) -> str:
    """Assert exit `code` and a stderr of exactly one line, without a traceback, naming all of `named`."""
    err = result.stderr
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert result.returncode == code, (result.returncode, err)
    assert err.startswith("ings-daemon: "), err
    for name in named:
        assert name in err, (name, err)
    return err


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "broken.json").write_text('{\n  "persona_id": "p",\n  "input": "hi",,\n}\n')
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3,\n{"a": 4}\n')
    (tmp_path / "number.json").write_text("42\n")
    (tmp_path / "mixed.json").write_text('[{"a": 1}, "two"]\n')
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("broken.json", ["broken.json", "line 3 column 17", "not valid JSON"]),
        ("broken.jsonl", ["broken.jsonl", "line 3", "column 9"]),
        ("missing.json", ["missing.json", "no such file"]),
        ("folder", ["folder", "is a directory"]),
        ("number.json", ["number.json", "a number", "JSON object"]),
        ("mixed.json", ["mixed.json", "item 2", "a string"]),
    ],
)
def test_send_answers_a_bad_file_in_one_line(bad_files: Path, name: str, named: list[str]) -> None:
    # The file is read before any broker is asked: the closed port is never reached.
    result = cli("send", str(bad_files / name), "--topic", "interaction", env=closed_port_env())
    one_line(result, 2, str(bad_files / name), *named)


def test_an_unknown_topic_is_one_line_listing_the_known_ones(tmp_path: Path) -> None:
    event = tmp_path / "one.json"
    event.write_text('{"persona_id": "p", "input": "a", "output": "b"}')
    env = closed_port_env()
    err = one_line(cli("send", str(event), "--topic", "interactions", env=env), 2, "'interactions'", SHORT_NAMES)
    assert "did you mean interaction?" in err
    one_line(cli("tail", "interaction", "adapter-redy", env=env), 2, "'adapter-redy'", SHORT_NAMES)
    one_line(cli("dlq", "list", "--topic", "custom.topic", env=env), 2, "'custom.topic'", SHORT_NAMES)
    prefixed = closed_port_env(INGS_TOPIC_PREFIX="staging-")
    one_line(cli("tail", "ings.nope", env=prefixed), 2, "'ings.nope'", "staging-ings.<name>", "INGS_TOPIC_PREFIX")
    # A topic the daemon writes (persona for handshake, an easy slip) takes no sends.
    one_line(cli("send", str(event), "--topic", "persona", env=env), 2, "ings.persona", "writes", "handshake, ")


def test_a_usage_error_is_one_line_pointing_to_help() -> None:
    result = cli("tail", "interaction", "--count", "abc", env=closed_port_env())
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--count" in result.stderr and "'abc'" in result.stderr and "ings-daemon tail --help" in result.stderr


def test_resolve_topic_takes_the_daemons_topics_only() -> None:
    topics = Topics.with_prefix("staging-")
    for name in ("tune-request", "tune_request", "ings.tune-request", "staging-ings.tune-request"):
        assert resolve_topic(name, topics) == "staging-ings.tune-request"
    for name in ("custom.topic", "interactions", "other-ings.dlq", ""):
        with pytest.raises(UserError, match="unknown topic") as err:
            resolve_topic(name, topics)
        assert err.value.code == 2


def test_an_unreachable_broker_is_one_line_for_every_command(tmp_path: Path) -> None:
    """send, tail, dlq and run against a closed port: one line (for run, one ERROR log line)
    naming KAFKA_BOOTSTRAP_SERVERS and the address, exit 1, within a bounded time."""
    event = tmp_path / "one.json"
    event.write_text('{"persona_id": "p", "input": "a", "output": "b"}')
    env = closed_port_env(INGS_HTTP_PORT=str(free_port()), CHROMADB_PATH=str(tmp_path / "chroma"))
    address = env["KAFKA_BOOTSTRAP_SERVERS"]
    commands = {
        "send": ["send", str(event), "--topic", "interaction"],
        "tail": ["tail", "interaction"],
        "dlq": ["dlq", "list"],
        "run": ["run"],
    }
    started = time.monotonic()
    # All at once: each spends its ~10 s waiting on the broker, not on the CPU.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "ings_daemon", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert time.monotonic() - started < 45
    for name in ("send", "tail", "dlq"):
        one_line(results[name], 1, "KAFKA_BOOTSTRAP_SERVERS", address, "cannot reach Kafka", "check that")
    run = results["run"]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]  # every line is a JSON log line
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "start_failed", lines
    assert "KAFKA_BOOTSTRAP_SERVERS" in errors[0]["error"] and address in errors[0]["error"], errors
    assert "check that the broker is running" in errors[0]["error"] and "Traceback" not in errors[0]["error"]
    assert not [line for line in lines if line["level"] == "warning"], lines  # no line per failed attempt
    began, failed = (datetime.fromisoformat(line["ts"]) for line in (lines[0], errors[0]))
    assert (failed - began).total_seconds() < 15, lines


def test_a_data_folder_it_cannot_write_is_one_error_line_naming_the_setting(tmp_path: Path) -> None:
    # Root may write anywhere, so the folder here is a file; tests/containers checks a
    # root-owned volume under the image's own user.
    blocked = tmp_path / "adapters"
    blocked.write_text("a file, not a folder")
    env = closed_port_env(INGS_HTTP_PORT=str(free_port()), INGS_ADAPTER_DIR=str(blocked), CHROMADB_PATH=str(tmp_path))
    run = cli("run", env=env, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in map(json.loads, run.stderr.splitlines()) if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "start_failed", errors
    assert f"INGS_ADAPTER_DIR={blocked}" in errors[0]["error"] and "not writable" in errors[0]["error"]


def test_an_http_port_in_use_is_one_error_line_naming_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = closed_port_env(INGS_HTTP_HOST="127.0.0.1", INGS_HTTP_PORT=str(port), CHROMADB_PATH=str(tmp_path / "c"))
        run = cli("run", env=env, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in map(json.loads, run.stderr.splitlines()) if line["level"] == "error"]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0]["error"], errors
    assert "INGS_HTTP_PORT" in errors[0]["error"] and "free one" in errors[0]["error"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INGS_HTTP_PORT", "abc"),
        ("KAFKA_MAX_POLL_RECORDS", "0"),
        ("CHROMADB_PORT", "70000"),
        ("INGS_HTTP_TOKEN", " padded "),
        ("CHROMADB_AUTH_TOKEN", "tok\x07en"),
        ("CHROMADB_AUTH_HEADER", "Cookie"),
        ("CHROMADB_TENANT", "../tenant"),
        ("CHROMADB_DATABASE", "a b"),
        ("CHROMADB_SSL_CA_FILE", "/nonexistent/ca.pem"),
        ("INGS_GATE_MIN_LEARNED", "1.5"),
        ("INGS_GATE_MAX_RETENTION_KL", "-1"),
    ],
)
def test_a_wrong_setting_is_one_line_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    for command in (["run"], ["tail", "interaction"]):
        result = cli(*command, env=base_env(**{variable: value}), cwd=tmp_path)
        one_line(result, 1, variable, "invalid configuration", ".env")


def _actions(parser: argparse.ArgumentParser, path: str = "ings-daemon") -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_has_help_and_run_help_lists_the_settings() -> None:
    missing = [f"{path} {a.dest}" for path, a in _actions(build_parser()) if not a.help]
    assert not missing, missing
    result = cli("run", "--help", env=base_env())
    assert result.returncode == 0
    # The help names the file that holds the settings table, and that file has the section it names.
    assert '"Configuration" of docs/configuration.md' in result.stdout
    assert "## Configuration\n" in (ROOT / "docs" / "configuration.md").read_text()
    for variable in ("KAFKA_BOOTSTRAP_SERVERS", "CHROMADB_HOST", "INGS_HTTP_PORT", "INGS_TOPIC_PREFIX"):
        assert variable in result.stdout


def test_read_events_names_the_line_of_a_bad_record(tmp_path: Path) -> None:
    lines = tmp_path / "events.json"  # JSON Lines though named .json: its first line is JSON
    lines.write_text('{"a": 1}\n\n{"a": 2}\n{"a" 3}\n')
    with pytest.raises(UserError, match=r"events\.json: line 4: not valid JSON at column 6") as err:
        read_events(lines)
    assert err.value.code == 2
    separator = tmp_path / "sep.jsonl"  # U+2028 is allowed unescaped inside a JSON string
    separator.write_text('{"a": "x\u2028y"}\n{"a": 2}\n', encoding="utf-8")
    assert read_events(separator) == [{"a": "x\u2028y"}, {"a": 2}]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b'\xef\xbb\xbf[{"a": 1}]')
    assert read_events(bom) == [{"a": 1}]
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"a": 1}\n{"a": NaN}\n')
    with pytest.raises(UserError, match="line 2: not valid JSON: NaN is not allowed"):
        read_events(nan)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.lists(json_values, max_size=4).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
    json_values.map(lambda v: json.dumps(v, indent=1).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=file_bytes, suffix=st.sampled_from([".json", ".jsonl", ""]))
def test_read_events_returns_objects_or_raises_a_user_error(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"events{suffix}"
    path.write_bytes(data)
    try:
        events = read_events(path)
    except UserError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc) and exc.code == 2
    else:
        assert isinstance(events, list) and all(isinstance(e, dict) for e in events)


# --- tail: Ctrl-C and a broker that goes away ---------------------------------------------


class Tail:
    """`ings-daemon tail` as a subprocess, its output in files read while it runs."""

    def __init__(self, tmp_path: Path, bootstrap: str, topics: Topics) -> None:
        self.out, self.err = tmp_path / "tail.out", tmp_path / "tail.err"
        prefix = topics.interaction.removesuffix("ings.interaction")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ings_daemon", "tail", "interaction", "--from-beginning"],
                env=base_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap, INGS_TOPIC_PREFIX=prefix),
                stdout=out,
                stderr=err,
                # A test run from a background shell inherits SIGINT ignored; Ctrl-C is the point here.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line)["event"] for line in self.out.read_text().splitlines()]

    def errors(self) -> list[str]:
        return self.err.read_text().splitlines()

    async def printed(self, event_id: str) -> bool:
        assert self.proc.poll() is None, f"tail exited: {self.err.read_text()}"
        return any(e.get("event_id") == event_id for e in self.events())

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.integration
async def test_tail_stops_quietly_on_ctrl_c(kafka: Kafka, tmp_path: Path) -> None:
    await kafka.produce(kafka.topics.interaction, [{"event_id": "e1", "persona_id": "p"}])
    tail = Tail(tmp_path, kafka.bootstrap, kafka.topics)
    try:
        await wait_for(lambda: tail.printed("e1"), 60, "tail to print the event")
        assert tail.interrupt() in (0, 130)
    finally:
        tail.kill()
    assert "Traceback" not in tail.err.read_text() and tail.errors() == []


@pytest.mark.integration
async def test_tail_backs_off_while_the_broker_is_away_and_goes_on(tmp_path: Path) -> None:
    topics = Topics.with_prefix("away-")
    broker = Broker(log_path=tmp_path / "tansu.log").start()
    kafka = Kafka(broker.bootstrap, topics)
    try:
        await kafka.produce(topics.interaction, [{"event_id": "before", "persona_id": "p"}])
        tail = Tail(tmp_path, broker.bootstrap, topics)
        try:
            await wait_for(lambda: tail.printed("before"), 60, "tail to print the first event")
            broker.stop()
            lost_at = time.monotonic()
            await wait_for(lambda: _said(tail, "no answer from Kafka", 3), 60, "three backoff lines")
            # 1 s, then 2 s, then 4 s ... apart: a handful of lines, not aiokafka's 40 a second.
            assert time.monotonic() - lost_at > 2.5
            assert len(tail.errors()) <= 5, tail.errors()
            assert all(broker.bootstrap in line and "KAFKA_BOOTSTRAP_SERVERS" in line for line in tail.errors())

            broker = Broker(broker.port, log_path=tmp_path / "tansu-again.log").start()
            await wait_for(lambda: _said(tail, "answers again"), 60, "tail to see the broker back")
            # Tansu keeps its log in memory: the restarted broker numbers from 0 again while
            # tail waits at offset 1, where the second of these lands.
            after = [{"event_id": f"after-{i}", "persona_id": "p"} for i in range(2)]
            await kafka.produce(topics.interaction, after)
            await wait_for(lambda: tail.printed("after-1"), 60, "tail to print an event sent after the restart")
            assert tail.interrupt() in (0, 130)
        finally:
            tail.kill()
    finally:
        broker.stop()
    errors = tail.errors()
    assert len(errors) < 10 and "Traceback" not in tail.err.read_text(), errors


async def _said(tail: Tail, text: str, times: int = 1) -> bool:
    assert tail.proc.poll() is None, f"tail exited: {tail.err.read_text()}"
    return sum(text in line for line in tail.errors()) >= times


# --- run: a Chroma server that cannot be reached ---------------------------------------------


@pytest.mark.integration
async def test_an_unreachable_chroma_is_named_at_start_and_the_daemon_runs_on(
    daemon_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    env = {**daemon_env, "CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(port)}
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:

        async def named() -> bool:
            assert daemon.proc is not None and daemon.proc.poll() is None, f"daemon exited:\n{daemon.log()}"
            status, body = await asyncio.to_thread(daemon.get, "/readyz")
            return status == 503 and f"127.0.0.1:{port}" in json.loads(body)["reasons"].get("chroma", "")

        await wait_for(named, 120, f"/readyz to name Chroma at 127.0.0.1:{port}")
        warnings = [
            json.loads(line)
            for line in daemon.log().splitlines()
            if line.startswith("{") and '"chroma_unreachable"' in line
        ]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning", daemon.log()
        assert f"127.0.0.1:{port}" in warnings[0]["problem"] and "CHROMADB_HOST" in warnings[0]["advice"]

        async def only_chroma_failing() -> bool:
            assert daemon.proc is not None and daemon.proc.poll() is None, f"daemon exited:\n{daemon.log()}"
            status, body = await asyncio.to_thread(daemon.get, "/readyz")
            return status == 503 and set(json.loads(body)["reasons"]) == {"chroma"}

        # It runs on: the consumer group is joined, only Chroma keeps it from being ready.
        await wait_for(only_chroma_failing, 60, "the daemon to join its group with Chroma still away")
        assert "Traceback" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
