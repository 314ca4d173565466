"""Unit tests of the logic: the contract, DIDs, decoding, offsets, dedupe, settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiokafka import TopicPartition
from conftest import EXAMPLES, ROOT, TECHLEAD

from ings_daemon.batching import Candidate, dedupe
from ings_daemon.bus import OffsetTracker, Record
from ings_daemon.cli import read_events, resolve_topic, write_schemas
from ings_daemon.config import Settings, Topics, load_settings
from ings_daemon.events import (
    DID_RE,
    SCHEMAS,
    Handshake,
    Interaction,
    TrainExample,
    TuneRequest,
    derived_event_id,
)
from ings_daemon.personas import mint_did
from ings_daemon.routing import Invalid, decode, is_transient


@dataclass
class FakeRecord:
    value: bytes | None
    topic: str = "ings.interaction"
    partition: int = 0
    offset: int = 0
    key: bytes | None = None


def test_schemas_do_not_drift(tmp_path: Path) -> None:
    write_schemas(tmp_path, check=False)
    for path in sorted(tmp_path.iterdir()):
        committed = ROOT / "schemas" / path.name
        assert committed.is_file(), f"{path.name} missing: run `ings-daemon schemas`"
        assert committed.read_text() == path.read_text(), f"{path.name} drifted: run `ings-daemon schemas`"
    assert write_schemas(ROOT / "schemas", check=True) == 0


@pytest.mark.parametrize(
    ("folder", "schema"),
    [
        ("personas", "handshake"),
        ("interactions", "interaction"),
        ("tune-requests", "tune-request"),
        ("recall", "recall-request"),
    ],
)
def test_examples_match_their_schema_and_model(folder: str, schema: str) -> None:
    spec = json.loads((ROOT / "schemas" / f"{schema}.schema.json").read_text())
    files = sorted((EXAMPLES / folder).glob("*.json*"))
    assert files
    for path in files:
        for event in read_events(path):
            jsonschema.validate(event, spec)
            SCHEMAS[schema].model_validate(event)


def test_guide_tune_body_is_accepted_unchanged() -> None:
    body = {
        "persona_id": TECHLEAD,
        "training_data": [{"input": "a", "output": "b"}],
        "lora_config": {"model_name": "meta-llama/Llama-3.2-1B", "rank": 8, "alpha": 16},
    }
    req = TuneRequest.model_validate(body)
    assert req.lora_config.rank == 8 and req.lora_config.alpha == 16 and not req.include_memory
    with pytest.raises(ValueError, match="less than or equal to 256"):
        TuneRequest.model_validate({**body, "lora_config": {"rank": 300}})


@pytest.mark.parametrize(
    "did",
    [
        TECHLEAD,
        "did:nings:artificial:llm:mentor:v1.0:6ff361c2c63e",
        "did:nings:artificial:llm:code_reviewer:v3:0123456789abcdef",
        "did:nings:artificial:llm:data-analyst:v1.2.3:abcdef",
    ],
)
def test_did_grammar_accepts(did: str) -> None:
    assert DID_RE.fullmatch(did)


@pytest.mark.parametrize(
    "did",
    [
        "did:nings:artificial:llm:../..:v1:abcdef",
        "did:nings:artificial:llm:techlead:v2.0:../../etc",
        "did:nings:artificial:llm:techlead:v..2:abcdef",
        "did:nings:artificial:llm:TechLead:v2.0:a7f3b9d2c8e1",
        "did:other:artificial:llm:techlead:v2.0:a7f3b9d2c8e1",
        "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1\n",
        "did:nings:artificial:llm:techlead:v2.0:abc",
        "",
    ],
)
def test_did_grammar_rejects(did: str) -> None:
    assert not DID_RE.fullmatch(did)


def test_minted_did_is_valid_and_deterministic() -> None:
    a = mint_did("Tech Lead (EU)", "2.0", "evt-1")
    assert DID_RE.fullmatch(a) and a.startswith("did:nings:artificial:llm:tech-lead-eu:v2.0:")
    assert mint_did("Tech Lead (EU)", "2.0", "evt-1") == a
    assert mint_did("Tech Lead (EU)", "2.0", "evt-2") != a
    assert DID_RE.fullmatch(mint_did("42 ..", "not a version", "e"))


def test_derived_event_id_ignores_key_order() -> None:
    a = derived_event_id("Interaction", {"persona_id": TECHLEAD, "input": "x", "output": "y"})
    b = derived_event_id("Interaction", {"output": "y", "input": "x", "persona_id": TECHLEAD})
    assert a == b and a != derived_event_id("Interaction", {"persona_id": TECHLEAD, "input": "x", "output": "z"})


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


def _c(i: str, o: str, v: list[float] | None) -> Candidate:
    return Candidate(TrainExample(id=f"{i}|{o}", input=i, output=o), v)


def test_dedupe_exact_and_near() -> None:
    kept = dedupe(
        [
            _c("Hello", "world", [1.0, 0.0, 0.0]),
            _c("hello ", "World", [0.0, 1.0, 0.0]),  # exact after normalising case and spaces
            _c("Hi", "there", [0.999, 0.02, 0.0]),  # near duplicate of the first
            _c("Other", "thing", [0.0, 0.0, 1.0]),
            _c("No vector", "kept", None),
        ]
    )
    assert [k.input for k in kept] == ["Hello", "Other", "No vector"]


def test_transient_errors_are_recognised() -> None:
    import httpx
    from aiokafka.errors import KafkaConnectionError

    assert is_transient(KafkaConnectionError("down"))
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(ValueError("Could not connect to a Chroma server"))
    assert not is_transient(ValueError("bad value"))


def test_topics_prefix_and_names() -> None:
    topics = Topics.with_prefix("staging-")
    assert topics.interaction == "staging-ings.interaction" and len(topics.all()) == 10
    assert resolve_topic("tune-request", topics) == "staging-ings.tune-request"
    assert resolve_topic("ings.dlq", topics) == "staging-ings.dlq"
    assert resolve_topic("custom.topic", topics) == "custom.topic"


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
