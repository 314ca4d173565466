"""`ings-daemon dlq list | redrive` against a real broker: filters, letters that are not
letters, re-sending original bytes exactly once, skipping what cannot be re-sent, dry run."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import TECHLEAD, Kafka

from ings_daemon.config import Settings, Topics, load_settings
from ings_daemon.contract.events import DeadLetter
from ings_daemon.dev.stack import Broker
from ings_daemon.runtime.dlq_admin import plan_redrive, read_dead_letters

pytestmark = pytest.mark.integration

NOT_JSON = b'{"persona_id": "' + TECHLEAD.encode() + b'", "input": '
INVALID = json.dumps({"persona_id": TECHLEAD, "input": "", "output": "empty input"}).encode()
BINARY = b"\xff\xfe\x00 not text at all"
LARGE = b'{"input": "' + b"x" * 5000 + b'"}'
GARBAGE = [b"garbage, not JSON", b'{"topic": "JSON, but not a dead letter"}']
ROW_KEYS = {"dlq_partition", "dlq_offset", "topic", "partition", "offset", "error_type", "reason", "value_size", "at"}


def letter(
    label: str,
    topic: str,
    offset: int,
    error_type: str,
    value: bytes | None,
    at: str,
    key: str | None = None,
    truncated: bool = False,
) -> DeadLetter:
    """A dead letter as the daemon writes it; `reason` is the label, to tell them apart."""
    kept = None if value is None else value[:64] if truncated else value
    return DeadLetter(
        topic=topic,
        partition=0,
        offset=offset,
        key=key,
        value_b64=None if kept is None else base64.b64encode(kept).decode(),
        value_truncated=truncated,
        value_size=len(value or b""),
        value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
        reason=label,
        error_type=error_type,
        at=datetime.fromisoformat(at),
    )


def make_letters(t: Topics) -> dict[str, DeadLetter]:
    return {
        d.reason: d
        for d in [
            letter("A", t.interaction, 1, "not_json", NOT_JSON, "2024-01-01T00:00:00+00:00", key=TECHLEAD),
            letter("B", t.interaction, 2, "invalid_event", INVALID, "2025-03-01T00:00:00+00:00", key=TECHLEAD),
            # The same record dead-lettered twice (a replay): re-driven once.
            letter("B2", t.interaction, 2, "invalid_event", INVALID, "2025-03-02T00:00:00+00:00", key=TECHLEAD),
            letter("C", t.handshake, 7, "not_json", BINARY, "2025-06-01T00:00:00+00:00"),
            letter("D", t.interaction, 3, "too_large", LARGE, "2025-06-01T00:00:00+00:00", truncated=True),
            letter("E", t.interaction, 4, "fetch_error", None, "2025-06-01T00:00:00+00:00"),
        ]
    }


def settings_for(broker: Broker, topics: Topics) -> Settings:
    return load_settings(kafka_bootstrap_servers=broker.bootstrap, ings_topic_prefix=prefix_of(topics))


def prefix_of(topics: Topics) -> str:
    return topics.handshake.removesuffix("ings.handshake")


@pytest.fixture
async def letters(kafka: Kafka, topics: Topics) -> dict[str, DeadLetter]:
    """The letters, plus two records that are not letters, on the test's DLQ topic."""
    found = make_letters(topics)
    await kafka.produce(topics.dlq, [d.model_dump_json().encode() for d in found.values()] + GARBAGE)
    return found


def cli(broker: Broker, topics: Topics, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CHROMADB_", "INGS_"))}
    env |= {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "INGS_TOPIC_PREFIX": prefix_of(topics)}
    return subprocess.run(
        [sys.executable, "-m", "ings_daemon", "dlq", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(set(row) == ROW_KEYS for row in found), found
    return found


async def raw_records(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record on a topic, read until nothing more comes for 1.5 s."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        await consumer._client.force_metadata_update()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: list[tuple[bytes | None, bytes | None]] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.5:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                found.extend((r.key, r.value) for r in records)
                quiet_since = time.monotonic()
        return found
    finally:
        await consumer.stop()


async def test_read_dead_letters_filters_and_skips_what_is_not_a_letter(
    broker: Broker, topics: Topics, letters: dict[str, DeadLetter], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(broker, topics)

    async def labels(topic: str | None = None, error_type: str | None = None, since: str | None = None) -> list[str]:
        at = datetime.fromisoformat(since) if since else None
        found = await read_dead_letters(settings, topic=topic, error_type=error_type, since=at)
        assert found == sorted(found, key=lambda item: item[:2])
        return sorted(d.reason for _, _, d in found)

    everything = await read_dead_letters(settings, topic=None, error_type=None, since=None)
    assert {d.reason: d for _, _, d in everything} == letters  # every field comes back intact
    assert capsys.readouterr().err.count("not a dead letter") == 2
    assert await labels(topic=topics.interaction) == ["A", "B", "B2", "D", "E"]
    assert await labels(error_type="not_json") == ["A", "C"]
    assert await labels(since="2025-03-02T00:00:00+00:00") == ["B2", "C", "D", "E"]
    assert await labels(since="2025-03-02T00:00:00") == ["B2", "C", "D", "E"]  # naive is UTC
    assert await labels(topic=topics.interaction, error_type="not_json") == ["A"]
    assert await labels(topic="no-such-topic") == []

    empty = load_settings(kafka_bootstrap_servers=broker.bootstrap, ings_topic_prefix=prefix_of(topics) + "x-")
    assert await read_dead_letters(empty, topic=None, error_type=None, since=None) == []  # no DLQ topic


def test_plan_redrive_skips_letters_without_their_whole_bytes(topics: Topics) -> None:
    found = make_letters(topics)
    tampered = found["A"].model_copy(update={"value_sha256": "0" * 64, "offset": 99})
    # A forged letter may name any topic: only the daemon's input topics are written.
    forged = found["A"].model_copy(update={"topic": topics.persona, "offset": 98})
    settings = load_settings(ings_topic_prefix=topics.handshake.removesuffix("ings.handshake"))
    items, skipped = plan_redrive(settings, [*found.values(), tampered, forged])
    assert any("is not an input topic" in why and topics.persona in why for why in skipped)
    assert [(i.topic, i.key, i.event) for i in items] == [
        (topics.interaction, TECHLEAD, NOT_JSON),
        (topics.interaction, TECHLEAD, INVALID),
        (topics.handshake, None, BINARY),
    ]
    assert len(skipped) == 5
    assert "duplicate" in skipped[0] and "truncated" in skipped[1] and "fetch_error" in skipped[2]
    assert "sha256" in skipped[3]


async def test_cli_list_filters(broker: Broker, topics: Topics, letters: dict[str, DeadLetter], tmp_path: Path) -> None:
    listed = cli(broker, topics, tmp_path, "list")
    assert sorted(str(r["reason"]) for r in rows(listed)) == ["A", "B", "B2", "C", "D", "E"]
    assert "6 dead letters" in listed.stderr and listed.stderr.count("not a dead letter") == 2

    only = cli(broker, topics, tmp_path, "list", "--topic", "interaction", "--error-type", "not_json")
    [row] = rows(only)
    a = letters["A"]
    assert row["topic"] == topics.interaction and (row["partition"], row["offset"]) == (a.partition, a.offset)
    assert (row["error_type"], row["value_size"], row["at"]) == ("not_json", len(NOT_JSON), a.at.isoformat())
    assert "1 dead letters" in only.stderr

    recent = cli(broker, topics, tmp_path, "list", "--since", "2025-05-01T00:00:00Z", "--topic", topics.handshake)
    assert [r["reason"] for r in rows(recent)] == ["C"]
    bad = cli(broker, topics, tmp_path, "list", "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


async def test_cli_redrive_dry_run_then_once_each(
    broker: Broker, topics: Topics, letters: dict[str, DeadLetter], tmp_path: Path
) -> None:
    dry = cli(broker, topics, tmp_path, "redrive", "--topic", "interaction")
    assert len(rows(dry)) == 5 and "dry run: would re-send 2, skip 3" in dry.stderr
    assert await raw_records(broker.bootstrap, topics.interaction) == []  # a dry run sends nothing

    sent = cli(broker, topics, tmp_path, "redrive", "--topic", "interaction", "--yes")
    assert len(rows(sent)) == 5 and "re-sent 2, skipped 3" in sent.stderr
    assert "duplicate" in sent.stderr and "truncated" in sent.stderr and "fetch_error" in sent.stderr
    arrived = await raw_records(broker.bootstrap, topics.interaction)
    assert sorted(arrived) == sorted([(TECHLEAD.encode(), NOT_JSON), (TECHLEAD.encode(), INVALID)])
    assert await raw_records(broker.bootstrap, topics.handshake) == []

    # One letter by its DLQ coordinates, as `dlq list` printed them.
    [c] = [r for r in rows(cli(broker, topics, tmp_path, "list")) if r["reason"] == "C"]
    where = f"{c['dlq_partition']}:{c['dlq_offset']}"
    one = cli(broker, topics, tmp_path, "redrive", "--offset", where, "99:0", "--yes")
    assert [r["reason"] for r in rows(one)] == ["C"] and "re-sent 1, skipped 0" in one.stderr
    assert "no matching dead letter at 99:0" in one.stderr
    assert await raw_records(broker.bootstrap, topics.handshake) == [(None, BINARY)]
    assert len(await raw_records(broker.bootstrap, topics.interaction)) == 2
