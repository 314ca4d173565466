"""Integration: hostile records against the real daemon, Tansu broker and Chroma.

Each hostile record is followed by a good interaction: every good one must be stored,
every hostile one dead-lettered exactly once with its error type, invalid tune requests
answered `rejected`, and the daemon must never exit. Good interactions compressed by a
librdkafka producer with each standard codec must be consumed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import TECHLEAD, Kafka, chroma_records, example_events, wait_for

from ings_daemon.config import Settings
from ings_daemon.contract.events import DeadLetter

pytestmark = pytest.mark.integration
MIB = 1_048_576


def good(i: int) -> dict[str, Any]:
    return {
        "event_id": f"good-{i}",
        "persona_id": TECHLEAD,
        "input": f"hostile test question {i} about retries",
        "output": f"answer {i}: back off, then try again",
    }


def persona_doc(**extra: Any) -> str:
    """The techlead handshake as JSON text (no event_id), with raw JSON members appended."""
    doc = example_events("personas/techlead_ings.json")[0]
    doc.pop("event_id", None)
    text = json.dumps(doc)
    for key, raw in extra.items():
        text = text[:-1] + f', "{key}": {raw}' + "}"
    return text


def hostile(t: Any) -> list[tuple[str, bytes | None, str]]:
    """(topic, raw value, expected error type) for each hostile record."""
    interaction = json.dumps(good(999))
    deep = '{"persona_id": "' + TECHLEAD + '", "input": "a", "output": "b", "metadata": ' + '{"a": ' * 5000
    deep += "1" + "}" * 5001
    metadata_surrogate = persona_doc().replace('"metadata": {', '"metadata": {"signature": "Ana Jo\\udce3o", ', 1)
    # 450 KB of 1e15 that the published persona would spell 1000000000000000.0: over 1 MiB.
    swollen = persona_doc().replace('"metadata": {', '"metadata": {"n": [' + ",".join(["1e15"] * 90_000) + "], ", 1)
    return [
        (t.handshake, swollen.encode(), "too_large"),
        (t.handshake, persona_doc(signature='"Ana Jo\\udce3o"').encode(), "invalid_unicode"),
        (t.handshake, metadata_surrogate.encode(), "invalid_unicode"),
        (
            t.tune_request,
            json.dumps({"persona_id": TECHLEAD, "request_id": "r-\udce3", "training_data": "x"}).encode(),
            "invalid_unicode",
        ),
        (
            t.tune_request,
            json.dumps({"persona_id": TECHLEAD, "request_id": "bad-rank", "lora_config": {"rank": 9999}}).encode(),
            "invalid_event",
        ),
        (
            t.tune_request,
            json.dumps(
                {
                    "persona_id": TECHLEAD,
                    "request_id": "huge",
                    "training_data": [{"input": "q" * 1000, "output": "a" * 1000}] * 2000,
                }
            ).encode(),
            "too_large",
        ),
        (t.interaction, interaction.replace('"input": "', '"input": "\\ud800', 1).encode(), "invalid_unicode"),
        (t.interaction, deep.encode(), "too_deep"),
        (t.interaction, interaction[:-1].encode() + b', "input": "again"}', "not_json"),
        (t.interaction, interaction.replace('"hostile', 'NaN, "x": "hostile', 1).encode(), "not_json"),
        (t.interaction, interaction[:-1].encode() + b', "n": ' + b"9" * 5000 + b"}", "not_json"),
        (t.interaction, b"\xc3\x28 not utf-8", "not_json"),
        (t.interaction, json.dumps({**good(998), "metadata": ["not", "an", "object"]}).encode(), "invalid_event"),
        # Metadata past 16,000 characters as JSON (here 6,000 keys): every memory stays small.
        (
            t.interaction,
            json.dumps({**good(997), "metadata": {f"k{i}": i for i in range(6000)}}).encode(),
            "invalid_event",
        ),
        (t.interaction, b"", "empty"),
        # A forget must say exactly what: never "everything" by a missing field.
        (
            t.forget,
            json.dumps({"request_id": "f", "persona_id": TECHLEAD, "scope": "events"}).encode(),
            "invalid_event",
        ),
        (t.forget, json.dumps({"request_id": "f", "persona_id": TECHLEAD, "scope": "all"}).encode(), "invalid_event"),
        (t.forget, json.dumps({"request_id": "f", "persona_id": "did:x", "scope": "persona"}).encode(), "invalid_did"),
    ]


async def produce_corrupt_batch(bootstrap: str, topic: str, key: str, partitions: int) -> None:
    """One record in a v2 batch whose CRC is wrong: the broker stores it, no client can read it."""
    import struct

    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner
    from aiokafka.record._crc32c import crc as crc32c

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        batch = producer.create_batch()
        batch.append(key=key.encode(), value=b"never readable", timestamp=None)
        batch.close()
        raw = bytearray(batch._builder.build())
        # v2 batch header: the CRC (bytes 17-20) covers everything from the attributes on.
        struct.pack_into(">I", raw, 17, crc32c(bytes(raw[21:])) ^ 0xFFFF)
        batch._buffer = bytes(raw)
        partition = DefaultPartitioner()(key.encode(), list(range(partitions)), None)
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


async def test_hostile_records_are_dead_lettered_and_good_ones_flow(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "INGS_ROLE": "ingest"})
    await kafka.produce(t.handshake, example_events("personas/techlead_ings.json"))
    await kafka.read(t.persona, min_count=1)

    records = hostile(t)
    for i, (topic, raw, _) in enumerate(records):
        await kafka.produce(topic, [raw if raw is not None else b""], key=TECHLEAD)
        await kafka.produce(t.interaction, [good(i)])
    # A batch no client can read: dead-lettered by its coordinates, consumption goes on.
    await produce_corrupt_batch(kafka.bootstrap, t.interaction, TECHLEAD, int(daemon_env["KAFKA_TOPIC_PARTITIONS"]))
    records.append((t.interaction, None, "fetch_error"))
    await kafka.produce(t.interaction, [good(len(records) - 1)])
    # A null value cannot be sent through the helper above (it sends b""): send one for real.
    records.append((t.interaction, None, "empty"))
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "partitioner": "murmur2_random"})
    producer.produce(t.interaction, None, key=TECHLEAD.encode())
    assert producer.flush(30) == 0
    # Good interactions compressed by librdkafka with each codec a standard producer uses.
    codecs = ("gzip", "snappy", "lz4", "zstd")
    for codec in codecs:
        compressed = Producer(
            {
                "bootstrap.servers": kafka.bootstrap,
                "partitioner": "murmur2_random",
                "enable.idempotence": False,
                "compression.type": codec,
                "linger.ms": 50,
            }
        )
        for n in range(5):
            event = {**good(0), "event_id": f"{codec}-{n}", "input": f"compressed with {codec}, number {n}"}
            compressed.produce(t.interaction, json.dumps(event).encode(), key=TECHLEAD.encode())
        assert compressed.flush(30) == 0

    expected_good = len(records) - 1 + 5 * len(codecs)
    await wait_for(lambda: daemon.added(expected_good), 120, f"{expected_good} good interactions stored")
    letters = [DeadLetter.model_validate(d) for d in await kafka.read(t.dlq, min_count=len(records), timeout=60)]
    assert len(letters) == len(records), [(d.topic, d.error_type, d.reason[:80]) for d in letters]
    assert Counter((d.topic, d.error_type) for d in letters) == Counter((tp, kind) for tp, _, kind in records)
    # Exactly once each: distinct coordinates.
    assert len({(d.topic, d.partition, d.offset) for d in letters}) == len(letters)
    # The 4 MB tune request: its letter keeps a prefix, the size and the hash, and fits Kafka.
    huge_raw = next(raw for topic, raw, kind in records if kind == "too_large" and topic == t.tune_request)
    assert huge_raw is not None
    huge = next(d for d in letters if d.error_type == "too_large" and d.topic == t.tune_request)
    swollen = next(d for d in letters if d.error_type == "too_large" and d.topic == t.handshake)
    assert "as published" in swollen.reason and "KAFKA_MAX_MESSAGE_BYTES" in swollen.reason
    assert huge.value_truncated and huge.value_size == len(huge_raw)
    assert huge.value_sha256 == hashlib.sha256(huge_raw).hexdigest()
    assert huge_raw.startswith(base64.b64decode(huge.value_b64 or ""))
    assert all(len(d.model_dump_json()) < MIB for d in letters)
    unreadable = next(d for d in letters if d.error_type == "fetch_error")
    assert unreadable.value_b64 is None and "CRC" in unreadable.reason
    assert await daemon.metric("ings_fetch_errors_total", topic=t.interaction) == 1

    statuses = await kafka.read(t.tune_status, min_count=3)
    rejected = [s for s in statuses if s["status"] == "rejected"]
    assert len(rejected) == 3 and {s["request_id"] for s in rejected} == {None, "bad-rank", "huge"}
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    assert daemon.get("/healthz")[0] == 200 and daemon.get("/readyz")[0] == 200

    group = daemon_env["KAFKA_GROUP_ID"]

    async def all_committed() -> bool:
        topics = (t.interaction, t.handshake, t.tune_request)
        return all([await kafka.fully_committed(group, topic) for topic in topics])

    await wait_for(all_committed, 30, "every input topic committed up to its highwater")
    assert daemon.stop() == 0
    stored = {r["event_id"] for r in chroma_records(tmp_path / "chroma")}
    assert {f"{codec}-{n}" for codec in codecs for n in range(5)} <= stored
    assert {f"good-{i}" for i in range(len(records) - 1)} <= stored
    # The swollen handshake was dead-lettered and stored nothing: the persona is the good one.
    base = Settings.model_fields["chromadb_collection"].default
    (persona,) = chroma_records(tmp_path / "chroma", f"{base}_personas")
    assert '"n":' not in str(persona["json"])
