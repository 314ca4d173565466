"""Unit tests of the contract: schemas and examples, DIDs, derived ids, de-duplication."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import patch

import jsonschema
import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, TECHLEAD
from hypothesis import given, settings
from hypothesis import strategies as st

from ings_daemon.cli import read_events, write_schemas
from ings_daemon.contract import examples
from ings_daemon.contract.events import Interaction, RecallRequest, TrainExample, TuneRequest
from ings_daemon.contract.examples import Candidate, dedupe
from ings_daemon.contract.ids import DID_RE, derived_event_id, mint_did
from ings_daemon.contract.schemas import SCHEMAS


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


ORIGIN = {
    "persona_id": TECHLEAD,
    "mode": "code_review",
    "message": "How do we make the nightly job safe?",
    "response": "Make it idempotent.",
    "timestamp": "2026-11-20T10:05:00Z",
    "metadata": {"context": "review", "validated_by": ["alice", "bob"], "ticket": {"id": "OPS-1"}, "gone": None},
}


def test_the_origin_interaction_forms_read_as_one_event() -> None:
    """Flat, origin names, wrapped: the same interaction; the wrapper's extras are ignored
    and its event_id applies when the inner has none."""
    flat = Interaction.model_validate(
        {
            "persona_id": TECHLEAD,
            "mode": "code_review",
            "input": ORIGIN["message"],
            "output": ORIGIN["response"],
            "occurred_at": ORIGIN["timestamp"],
            "metadata": ORIGIN["metadata"],
        }
    )
    origin = Interaction.model_validate(ORIGIN)
    wrapped = Interaction.model_validate({"version": "2.0", "protocol": "INGS", "interaction": ORIGIN})
    assert flat == origin == wrapped
    assert origin.occurred_at is not None and origin.occurred_at.isoformat() == "2026-11-20T10:05:00+00:00"
    assert Interaction.model_validate({"event_id": "e-1", "interaction": ORIGIN}).event_id == "e-1"
    inner_wins = {"event_id": "outer", "interaction": {**ORIGIN, "event_id": "inner"}}
    assert Interaction.model_validate(inner_wins).event_id == "inner"
    with pytest.raises(ValueError, match="give `input` or `message`, not both"):
        Interaction.model_validate({**ORIGIN, "input": "again"})
    with pytest.raises(ValueError, match="`interaction` must be an object"):
        Interaction.model_validate({"version": "2.0", "interaction": "hello"})
    with pytest.raises(ValueError, match="ISO 8601"):
        Interaction.model_validate({**ORIGIN, "timestamp": 1764000000})


def test_metadata_is_kept_exactly_as_sent() -> None:
    """Keys and strings are not stripped: keys differing only by spaces stay two keys."""
    meta = {" k ": " v ", "k": [" x "], "n": 2**70}
    assert Interaction.model_validate({**ORIGIN, "metadata": meta}).metadata == meta
    with pytest.raises(ValueError, match="at most 16000"):
        Interaction.model_validate({**ORIGIN, "metadata": {"big": "x" * 16_001}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
interaction_fields = st.fixed_dictionaries(
    {"persona_id": st.just(TECHLEAD)},
    optional={
        name: st.text(min_size=1, max_size=5).filter(str.strip)
        for name in ("input", "message", "output", "response", "mode")
    }
    | {
        "occurred_at": st.just("2026-11-20T10:05:00Z"),
        "timestamp": st.just("2026-11-20T10:05:00Z"),
        "metadata": st.dictionaries(st.text(max_size=6), json_values, max_size=4),
        "extra": st.just(1),
    },
)


@settings(max_examples=300, deadline=None)
@given(fields=interaction_fields, wrap=st.booleans())
def test_the_interaction_schema_accepts_what_the_model_accepts(fields: dict[str, Any], wrap: bool) -> None:
    """The published schema documents every form: it and the model agree on any mix of
    the fields and names, flat or wrapped."""
    spec = json.loads((ROOT / "schemas" / "interaction.schema.json").read_text())
    event = {"version": "2.0", "interaction": fields} if wrap else fields
    try:
        Interaction.model_validate(event)
        model_ok = True
    except ValueError:
        model_ok = False
    schema_ok = jsonschema.Draft202012Validator(spec).is_valid(event)
    assert model_ok == schema_ok, event


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
    # Numbers and flags are strict: no silent conversion of strings or booleans.
    for lora in ({"epochs": "3"}, {"rank": True}, {"alpha": "16"}, {"rank": 8.0}):
        with pytest.raises(ValueError, match="valid"):
            TuneRequest.model_validate({**body, "lora_config": lora})
    with pytest.raises(ValueError, match="valid boolean"):
        TuneRequest.model_validate({**body, "include_memory": "yes"})
    with pytest.raises(ValueError, match="valid integer"):
        RecallRequest.model_validate({"persona_id": TECHLEAD, "query": "q", "request_id": "r", "k": True})


@pytest.mark.parametrize(
    "did",
    [
        TECHLEAD,
        "did:nings:artificial:llm:mentor:v1.0:0b02d4ddc497",
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


@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_dedupe_in_blocks_matches_the_whole_matrix(clusters: list[int], block: int) -> None:
    """Comparing a block of rows at a time keeps exactly what the full n x n comparison keeps."""
    rng = np.random.default_rng(len(clusters))
    centres = rng.normal(size=(6, 8))
    vectors = [centres[c] + rng.normal(scale=0.05, size=8) for c in clusters]
    candidates = [_c(f"q{i}", f"a{i}", [float(x) for x in v]) for i, v in enumerate(vectors)]
    unit = np.asarray(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar, dropped = unit @ unit.T, set()
    for i in range(len(vectors)):
        if i not in dropped:
            dropped |= {j for j in range(i + 1, len(vectors)) if similar[i, j] >= examples.NEAR_DUPLICATE_COSINE}
    expected = [c.example for i, c in enumerate(candidates) if i not in dropped]
    with patch.object(examples, "SIMILARITY_BLOCK", block):
        assert dedupe(candidates) == expected


def test_a_claim_check_names_each_example_once_and_times_are_iso_text() -> None:
    from ings_daemon.contract.events import ExampleSet, Interaction

    with pytest.raises(ValueError, match="unique"):
        ExampleSet(collection="memory", ids=["a", "a"], sha256="0" * 64)
    base = {"persona_id": TECHLEAD, "input": "a", "output": "b"}
    for stamp in (0, -1, 1e9, True):
        with pytest.raises(ValueError, match="ISO 8601"):
            Interaction.model_validate({**base, "occurred_at": stamp})
    stored = Interaction.model_validate({**base, "occurred_at": "2026-11-20T10:00:00"})
    assert stored.occurred_at is not None and stored.occurred_at.utcoffset() is not None
