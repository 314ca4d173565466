"""Unit tests of the runtime: decoding, offsets, errors, dead letters, settings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from conftest import EXAMPLES, TECHLEAD, FakeRecord

from ings_daemon.cli import event_key, read_events, resolve_topic
from ings_daemon.config import Settings, Topics, load_settings
from ings_daemon.contract.events import Handshake, Interaction
from ings_daemon.errors import UserError
from ings_daemon.runtime.consumer import OffsetTracker
from ings_daemon.runtime.decode import Invalid, decode
from ings_daemon.runtime.kafka import Producer, Publish, Record
from ings_daemon.runtime.router import is_transient


def test_send_keys_each_form_by_its_persona() -> None:
    """Records of one persona land on one partition, whichever form they were written in."""
    assert event_key({"persona_id": TECHLEAD, "input": "a"}) == TECHLEAD
    assert event_key({"version": "2.0", "interaction": {"persona_id": TECHLEAD}}) == TECHLEAD
    assert event_key({"version": "2.0", "persona": {"persona_id": TECHLEAD, "name": "T"}}) == TECHLEAD
    assert event_key({"persona": {"name": "to be minted"}}) is None
    assert event_key({"interaction": "not an object", "persona_id": 7}) is None


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (None, "empty"),
        (b"{", "not_json"),
        (b"\xff", "not_json"),
        (b'"text"', "not_object"),
        (json.dumps({"persona_id": "did:x", "input": "a", "output": "b"}).encode(), "invalid_did"),
        (json.dumps({"persona_id": TECHLEAD, "input": "a"}).encode(), "invalid_event"),
        (json.dumps({"persona_id": TECHLEAD, "input": "a" * 500, "output": "b"}).encode(), "too_large"),
    ],
)
def test_decode_classifies_bad_input(raw: bytes | None, kind: str) -> None:
    with pytest.raises(Invalid) as err:
        decode(FakeRecord(raw), Interaction, max_bytes=400)
    assert err.value.kind == kind and str(err.value)


def test_decode_keeps_unknown_keys_of_a_persona_document() -> None:
    doc = json.loads((EXAMPLES / "personas/techlead_ings.json").read_text())
    item = decode(FakeRecord(json.dumps(doc).encode()), Handshake, 10_000)
    assert item.event.persona.persona_id == TECHLEAD and item.event_id.startswith("derived-")


def test_offset_tracker_commits_only_the_finished_prefix() -> None:
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    tracker = OffsetTracker()
    records: list[Record] = [FakeRecord(b"", "t", 0, o) for o in range(10, 15)]
    tracker.begin({tp: records, other: [FakeRecord(b"", "t", 1, 3)]})
    tracker.finish([records[0], records[1], records[3]])
    assert tracker.take_committable() == {tp: 12}
    tracker.finish([records[2]])
    assert tracker.take_committable() == {tp: 14}
    tracker.forget([other])
    tracker.finish([records[4]])
    assert tracker.take_committable() == {tp: 15} and tracker.take_committable() == {}


def test_transient_errors_are_recognised() -> None:
    import httpx
    from aiokafka.errors import KafkaConnectionError

    assert is_transient(KafkaConnectionError("down"))
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(ValueError("Could not connect to a Chroma server"))
    assert not is_transient(ValueError("bad value"))


def test_topics_prefix_and_names() -> None:
    topics = Topics.with_prefix("staging-")
    assert topics.interaction == "staging-ings.interaction" and len(topics.all()) == 16
    assert resolve_topic("tune-request", topics) == "staging-ings.tune-request"
    assert resolve_topic("ings.dlq", topics) == "staging-ings.dlq"
    assert resolve_topic("staging-ings.persona", topics) == "staging-ings.persona"
    with pytest.raises(UserError, match=r"unknown topic 'custom\.topic'"):
        resolve_topic("custom.topic", topics)


def test_settings_read_env_and_reject_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("INGS_ALLOWED_BASE_MODELS", "a/b, c")
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "")
    s = Settings()
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092" and s.ings_allowed_base_models == ["a/b", "c"]
    assert s.huggingface_token is None and s.chromadb_port == 8001 and s.ings_min_examples == 10
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "p4ss-w0rd")
    with pytest.raises(SystemExit, match="needs KAFKA_SASL_USERNAME") as err:
        load_settings()
    assert "p4ss-w0rd" not in str(err.value)
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    options: dict[str, Any] = load_settings().kafka_common()
    assert options["sasl_plain_username"] == "svc" and options["security_protocol"] == "SASL_SSL"
    assert "p4ss-w0rd" not in repr(load_settings())


def test_read_events_accepts_json_and_jsonl(tmp_path: Path) -> None:
    one, lines = tmp_path / "one.json", tmp_path / "many.jsonl"
    one.write_text(json.dumps({"a": 1}, indent=2))
    lines.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_events(one) == [{"a": 1}] and read_events(lines) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'{"persona_id": "x", "input": "\\udce3", "output": "b"}', "invalid_unicode"),
        (b'{"\\ud800key": 1}', "invalid_unicode"),
        (b'{"a": 1, "a": 2}', "not_json"),
        (b'{"a": NaN}', "not_json"),
        (b'{"a": -Infinity}', "not_json"),
        (b'{"a": [1e400]}', "not_json"),
        ('{"persona_id": "x", "input": "a", "output": "b"}'.encode("utf-16"), "not_json"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not_json"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b'{"a": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, "too_deep"),
    ],
)
def test_decode_rejects_what_no_event_can_be(raw: bytes, kind: str) -> None:
    with pytest.raises(Invalid) as err:
        decode(FakeRecord(raw), Interaction, max_bytes=10_000_000)
    assert err.value.kind == kind and str(err.value)


def test_a_utf8_byte_order_mark_is_ignored() -> None:
    raw = json.dumps({"persona_id": TECHLEAD, "input": "a", "output": "b"}).encode()
    assert decode(FakeRecord(b"\xef\xbb\xbf" + raw), Interaction, 10_000).event.input == "a"


def test_a_rejected_persona_document_with_a_surrogate_never_derives_an_id() -> None:
    doc = json.loads((EXAMPLES / "personas/techlead_ings.json").read_text())
    doc.pop("event_id", None)
    raw = json.dumps(doc)[:-1] + ', "signature": "Ana Jo\\udce3o"}'
    with pytest.raises(Invalid, match="surrogate") as err:
        decode(FakeRecord(raw.encode()), Handshake, 10_000)
    assert err.value.kind == "invalid_unicode"


def test_offset_tracker_rewind_drops_the_deferred_suffix() -> None:
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    records: list[Record] = [FakeRecord(b"", "t", 0, o) for o in range(5)]
    tracker.begin({tp: records})
    tracker.finish(records[:2] + records[3:])
    tracker.rewind(tp, 2)
    assert tracker.take_committable() == {tp: 2} and tracker.pending[tp] == []


def test_permanent_errors_are_not_retried_forever() -> None:
    from aiokafka.errors import (
        KafkaTimeoutError,
        MessageSizeTooLargeError,
        TopicAuthorizationFailedError,
        UnsupportedCodecError,
    )

    from ings_daemon.runtime.kafka import EventTooLarge

    assert is_transient(KafkaTimeoutError())
    for exc in (
        MessageSizeTooLargeError(),
        TopicAuthorizationFailedError(),
        UnsupportedCodecError(),
        EventTooLarge("t", 2, 1),
    ):
        assert not is_transient(exc)


def test_dead_letters_fit_kafka_whatever_the_record() -> None:
    import base64
    import hashlib

    from ings_daemon.runtime.deadletters import letter_for, original_value

    small = FakeRecord(b"{oops", key=b"k")
    letter = letter_for(small, "r" * 10_000, "not_json", 1_048_576)
    assert original_value(letter) == b"{oops" and not letter.value_truncated and len(letter.reason) == 2000
    value = bytes(range(256)) * 16_384  # 4 MiB
    big = FakeRecord(value, key=b"\xff" * 100_000)
    letter = letter_for(big, "\udce3 reason", "too_large", 1_048_576)
    assert letter.value_truncated and letter.value_size == len(value) and original_value(letter) is None
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    assert value.startswith(base64.b64decode(letter.value_b64 or ""))
    assert len(letter.model_dump_json().encode()) < 1_048_576
    # A value just under the limit is kept whole only if its letter still fits.
    edge = FakeRecord(b"x" * 1_000_000)
    assert len(letter_for(edge, "r", "too_large", 1_048_576).model_dump_json().encode()) < 1_048_576


async def test_the_producer_refuses_events_over_the_limit() -> None:
    from ings_daemon.runtime.kafka import EventTooLarge, Producer, Publish

    producer = Producer(Settings(kafka_max_message_bytes=65_536))
    assert producer.encode(Publish("t", "k", b"x" * 60_000))[1] == b"x" * 60_000
    with pytest.raises(EventTooLarge, match="KAFKA_MAX_MESSAGE_BYTES"):
        producer.encode(Publish("t", "k", b"x" * 65_536))


def test_ownership_follows_the_murmur2_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from ings_daemon.runtime.kafka import Ownership

    owned = Ownership("ings.interaction")
    assert not owned.owns(TECHLEAD)
    partition = DefaultPartitioner()(TECHLEAD.encode(), [0, 1, 2], None)
    owned.assign([TopicPartition("ings.interaction", partition), TopicPartition("other", 0)], 3)
    assert owned.owns(TECHLEAD) and owned.generation == 1
    owned.assign([TopicPartition("ings.interaction", (partition + 1) % 3)], 3)
    assert not owned.owns(TECHLEAD) and owned.generation == 2


def test_a_handler_that_does_not_take_its_routes_model_is_a_type_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    snippet = tmp_path / "mismatch.py"
    snippet.write_text(
        "from ings_daemon.contract.events import Handshake, Interaction\n"
        "from ings_daemon.runtime.decode import Incoming\n"
        "from ings_daemon.runtime.router import Outcome, Route\n\n\n"
        "async def interactions(items: list[Incoming[Interaction]]) -> Outcome:\n"
        "    return Outcome()\n\n\n"
        "good = Route(Interaction, interactions)\n"
        "bad = Route(Handshake, interactions)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent", str(snippet)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1 and "mismatch.py:11:" in errors[0], result.stdout


class RecordingProducer(Producer):
    """The runtime's producer with its real size check, recording instead of sending."""

    def __init__(self, max_bytes: int = 1_048_576) -> None:  # no Kafka client
        self.max_bytes = max_bytes
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, items: Iterable[Publish]) -> None:
        encoded = [(item.topic, self.encode(item)[1]) for item in items]
        self.sent += [(topic, value) for topic, value in encoded if value is not None]


async def test_an_answer_too_large_for_kafka_dead_letters_only_its_record() -> None:
    from ings_daemon.contract.events import TuneStatus
    from ings_daemon.runtime.decode import Incoming
    from ings_daemon.runtime.router import Outcome, Route, Router

    async def echo(items: list[Incoming[Interaction]]) -> Outcome:
        # Each record is answered with its input, except "big", whose answer is over 1 MiB.
        answers = [("x" * 1_100_000 if i.event.input == "big" else i.event.input) for i in items]
        return Outcome(
            publish=[
                Publish("answers", None, TuneStatus(persona_id=None, status="progress", reason=a)) for a in answers
            ]
        )

    producer = RecordingProducer()
    router = Router({"in": Route(Interaction, echo)}, producer, "dlq", 10_000, 0.01)
    records: list[Record] = [
        FakeRecord(json.dumps({"persona_id": TECHLEAD, "input": text, "output": "o"}).encode(), "in", 0, n)
        for n, text in enumerate(["a", "b", "big", "c"])
    ]
    finished, deferred = await router.process({TopicPartition("in", 0): records})
    assert len(finished) == 4 and deferred == []
    letters = [json.loads(value) for topic, value in producer.sent if topic == "dlq"]
    assert [(d["offset"], d["error_type"]) for d in letters] == [(2, "processing_error")]
    assert "KAFKA_MAX_MESSAGE_BYTES" in letters[0]["reason"]
    assert sorted(json.loads(value)["reason"] for topic, value in producer.sent if topic == "answers") == [
        "a",
        "b",
        "c",
    ]


_HEAP_PROBE = """
import psutil
from ings_daemon.runtime import heap
if heap._LIBC is None:
    print("skip")
    raise SystemExit
heap.trim()
process = psutil.Process()
start = process.memory_info().rss
# Many mid-sized blocks with a small one pinned after each (1,000 bytes: malloc's, not
# Python's small-object arenas): freed, they stay in glibc's heap below the pins.
blocks = [(bytearray(60_000), bytearray(1_000)) for _ in range(3000)]
grown = process.memory_info().rss - start
pins = [small for _, small in blocks]
del blocks
before = process.memory_info().rss
trimmed = heap.trim()
print(trimmed, grown, before - process.memory_info().rss)
"""


def test_trimming_the_heap_gives_freed_memory_back() -> None:
    """What glibc keeps after a burst of allocations goes back to the OS: RSS falls.

    Run in a fresh interpreter: in the long test process earlier tests leave holes in the
    heap that the blocks fill, so how much a trim can return there depends on test order.
    """
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc: nothing to trim")
    trimmed, grown, returned = out[0] == "True", int(out[1]), int(out[2])
    assert trimmed
    assert returned > grown / 2 > 0
