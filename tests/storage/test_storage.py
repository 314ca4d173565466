"""Embedded Chroma through the storage layer: per-persona memory, newest windows, reads
that create nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import chromadb
import pytest
from conftest import TECHLEAD, memory_collections
from hypothesis import given, settings
from hypothesis import strategies as st

from ings_daemon.config import Settings
from ings_daemon.storage import metadata as stored
from ings_daemon.storage.chroma import Collections, Record, memory_of

OTHER = "did:nings:artificial:llm:other:v1.0:0123456789ab"


def record(persona: str, n: int) -> Record:
    vector = [0.0] * 384
    vector[n % 384] = 1.0
    return Record(
        id=f"{persona[-6:]}-{n}",
        document=f"input: q{n}\noutput: a{n}",
        metadata={"persona_id": persona, "input": f"q{n}", "output": f"a{n}", "ingested_ts": float(n)},
        embedding=vector,
    )


def bucket_mate(persona: str) -> str:
    """A DID whose memories share `persona`'s bucket."""
    from ings_daemon.storage.buckets import bucket_of

    return next(
        did
        for n in range(10_000)
        if bucket_of(did := f"did:nings:artificial:llm:mate:v1.0:{n:012x}") == bucket_of(persona)
    )


async def test_each_persona_has_its_own_memory_and_jobs_read_a_newest_window(tmp_path: Path) -> None:
    collections = Collections(Settings(chromadb_path=tmp_path / "chroma"))
    mate = bucket_mate(TECHLEAD)
    for start in range(0, 30, 7):  # several writes, as batches arrive, interleaved with a bucket mate's
        await collections.add(memory_of(TECHLEAD), [record(TECHLEAD, n) for n in range(start, min(start + 7, 30))])
        await collections.add_memories([record(mate, n) for n in range(start, min(start + 7, 30))])
    await collections.add(memory_of(OTHER), [record(OTHER, n) for n in range(3)])
    assert [r.metadata["input"] for r in await collections.newest(memory_of(mate), 4)] == ["q26", "q27", "q28", "q29"]
    assert {r.metadata["persona_id"] for r in await collections.get(memory_of(mate))} == {mate}
    await collections.drop_memory(mate)

    newest = await collections.newest(memory_of(TECHLEAD), 10, embeddings=True)
    assert [r.metadata["input"] for r in newest] == [f"q{n}" for n in range(20, 30)]
    assert all(r.embedding is not None and len(r.embedding) == 384 for r in newest)
    assert len(await collections.newest(memory_of(OTHER), 10)) == 3
    found = await collections.query(memory_of(OTHER), record(OTHER, 1).embedding or [], 5)
    assert found[0].id == record(OTHER, 1).id and {r.metadata["persona_id"] for r in found} == {OTHER}
    assert await collections.memory_personas() == sorted([TECHLEAD, OTHER])

    # Reads of a persona with no memory answer empty, even in a bucket it shares, and add
    # nobody to the index.
    stranger = memory_of("did:nings:artificial:llm:nobody:v1.0:abcdef")
    assert await collections.query(stranger, [1.0] + [0.0] * 383, 5) == []
    assert await collections.newest(stranger, 10) == [] and await collections.existing_ids(stranger, ["x"]) == set()
    assert await collections.existing_ids(stranger, [record(OTHER, 1).id]) == set()  # another persona's id
    assert await Collections(collections.settings).memory_personas() == sorted([TECHLEAD, OTHER])
    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=chromadb.Settings(anonymized_telemetry=False)
    )
    assert sum(c.count() for c in memory_collections(client)) == 33

    # A persona's erasure removes its records and index entry, and nobody else's.
    await collections.drop_memory(TECHLEAD)
    assert await collections.newest(memory_of(TECHLEAD), 10) == []
    assert len(await collections.newest(memory_of(OTHER), 10)) == 3
    assert await Collections(collections.settings).memory_personas() == [OTHER]


async def test_a_claim_check_cannot_name_another_personas_tune_examples(tmp_path: Path) -> None:
    import pytest

    from ings_daemon.contract.events import TrainExample
    from ings_daemon.contract.examples import example_set
    from ings_daemon.storage.examples import ExamplesUnavailable, keep_examples, load_examples

    collections = Collections(Settings(chromadb_path=tmp_path / "chroma"))
    theirs = [TrainExample(id=f"ex-{n}", input=f"secret q{n}", output=f"secret a{n}") for n in range(3)]
    await keep_examples(collections, OTHER, theirs, [record(OTHER, n).embedding or [] for n in range(3)])
    claim = example_set("examples", theirs)
    assert [e.input for e in (await load_examples(collections, OTHER, claim))[0]] == [e.input for e in theirs]
    with pytest.raises(ExamplesUnavailable, match="another persona"):
        await load_examples(collections, TECHLEAD, claim)


async def test_a_rebuilt_backlog_holds_the_untrained_ids_and_the_oldest_time(tmp_path: Path) -> None:
    """After a restart the batcher knows which records wait for a job and since when, read
    as ids and one timestamp per persona; records already in a job are not counted."""
    from aiokafka import TopicPartition

    from ings_daemon.ingest.batcher import Batcher
    from ings_daemon.runtime.kafka import Ownership

    def waiting(persona: str, n: int) -> Record:
        r = record(persona, n)
        return Record(id=r.id, document=r.document, metadata={**r.metadata, "job_id": ""}, embedding=r.embedding)

    settings = Settings(chromadb_path=tmp_path / "chroma", ings_base_model="tiny-llama", ings_min_examples=100)
    collections = Collections(settings)
    await collections.add(memory_of(TECHLEAD), [waiting(TECHLEAD, n) for n in range(30)])
    await collections.update_metadata(
        memory_of(TECHLEAD), [record(TECHLEAD, n).id for n in range(10)], {"job_id": "j1"}
    )
    await collections.add(memory_of(OTHER), [waiting(OTHER, n) for n in range(3)])

    untrained = await collections.untrained()
    assert untrained[TECHLEAD] == ({record(TECHLEAD, n).id for n in range(10, 30)}, 10.0)
    assert set(untrained) == {TECHLEAD, OTHER}

    ownership = Ownership(settings.topics.interaction)
    ownership.assign([TopicPartition(settings.topics.interaction, p) for p in range(3)], 3)
    batcher = Batcher(settings, collections, ownership)
    await batcher.rebuild()
    assert {p: (len(w.ids), w.oldest) for p, w in batcher.backlog.items()} == {TECHLEAD: (20, 10.0), OTHER: (3, 0.0)}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=40,
)
_chroma = chromadb.EphemeralClient(chromadb.Settings(anonymized_telemetry=False))
_flat = _chroma.get_or_create_collection("flat_metadata", embedding_function=None)


@settings(max_examples=150, deadline=None)
@given(metadata=st.dictionaries(st.text(max_size=5), json_values, max_size=8))
def test_any_json_metadata_is_stored_by_chroma_and_restored_exactly(metadata: dict[str, Any]) -> None:
    """Whatever JSON a producer sends, the flat fields are ones real Chroma accepts, they are
    bounded, and the record gives back the original exactly."""
    fields: dict[str, Any] = {"persona_id": TECHLEAD, **stored.flatten(metadata)}
    fields[stored.ORIGINAL] = stored.original(metadata)
    assert len(fields) <= stored.MAX_FIELDS + 2
    _flat.upsert(ids=["r"], embeddings=[[0.1, 0.2]], metadatas=[fields])
    back = _flat.get(ids=["r"], include=["metadatas"])["metadatas"][0]
    assert stored.restored(back) == metadata
    for key, value in stored.flatten(metadata).items():
        # What is indexed is what was sent; Chroma may round a float's last digit (seen:
        # 9.624260117713745e+32 back as ...744e+32), the original keeps it exactly.
        floats = isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float))
        assert back[key] == (pytest.approx(value, rel=1e-12) if floats else value)


def test_nested_metadata_becomes_dotted_fields_and_what_chroma_cannot_hold_stays_in_the_original() -> None:
    meta = {
        "context": "review",
        "validated_by": ["alice", "bob"],
        "ticket": {"id": "OPS-1", "tags": {"p": 2}},
        "gone": None,
        "mixed": [1, 2.5],
        "objects": [{"a": 1}],
        "huge": 2**70,
        "empty": [],
        "a.b": 1,
        "a": {"b": 2},
    }
    assert stored.flatten(meta) == {
        "meta.context": "review",
        "meta.validated_by": ["alice", "bob"],
        "meta.ticket.id": "OPS-1",
        "meta.ticket.tags.p": 2,
        "meta.mixed": [1.0, 2.5],
        "meta.a.b": 1,  # the first spelling of a key wins
    }
    assert stored.restored({stored.ORIGINAL: stored.original(meta)}) == meta
    assert len(stored.flatten({f"k{i}": i for i in range(500)})) == stored.MAX_FIELDS
    # A record stored before the original was kept gives back its flat fields.
    assert stored.restored({"meta.channel": "slack", "input": "q"}) == {"channel": "slack"}


def test_the_erasure_ledger_finds_the_versions_trained_on_erased_data(tmp_path: Path) -> None:
    """Only training examples count (held-out ones shaped no weights); a retired version is
    retired once, and is never the baseline of the next run on its base model."""
    import json

    from ings_daemon.storage.adapters import MANIFEST, AdapterStore
    from ings_daemon.storage.erasures import ErasureLedger

    store = AdapterStore(tmp_path / "adapters")
    for train, held in ((["a", "b"], ["c"]), (["c", "d"], ["a"]), (["e"], [])):
        tmp = store.new_tmp_dir(TECHLEAD)
        manifest = {"base_model": "tiny", "examples": {"train": train, "eval": held}}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        store.publish(TECHLEAD, tmp)
    ledger = ErasureLedger(store)
    assert ledger.trained_on(TECHLEAD, ["a"]) == [1]
    assert ledger.trained_on(TECHLEAD, ["c", "e"]) == [2, 3]
    assert ledger.trained_on(TECHLEAD, None) == [1, 2, 3]
    assert ledger.trained_on(OTHER, None) == []  # another persona's folder is never read
    ledger.record(TECHLEAD, "erasure", "r1", ["a"], [1])
    ledger.record(TECHLEAD, "retention", None, ["e"], [3])
    assert ledger.retired(TECHLEAD) == {1, 3} and ledger.erased_ids(TECHLEAD) == {"a", "e"}
    assert ledger.trained_on(TECHLEAD, ["a", "e"]) == []  # retired once
    assert (store.latest_on(TECHLEAD, "tiny", frozenset(ledger.retired(TECHLEAD))) or (0,))[0] == 2
    # A torn last line (a crash while appending) is skipped, the rest still read.
    with (store.persona_dir(TECHLEAD) / "erasures.jsonl").open("a") as f:
        f.write('{"reason": "erasure", "versions": [')
    assert ledger.retired(TECHLEAD) == {1, 3}


@settings(max_examples=300, deadline=None)
@given(
    token=st.text(min_size=1, max_size=40).map(lambda t: "Zq9" + t),  # a marker nothing else holds
    header=st.text(max_size=20) | st.sampled_from(["Authorization", "X-Chroma-Token"]),
    place=st.text(max_size=30) | st.from_regex(r"[a-z][a-z0-9_-]{2,20}", fullmatch=True),
)
def test_chroma_settings_take_any_text_and_never_repeat_the_token(token: str, header: str, place: str) -> None:
    """CHROMADB_AUTH_TOKEN / _HEADER / _TENANT / _DATABASE from a hostile environment: a
    usable value or one SystemExit line naming the setting, never the token, and a tenant
    or database that could not be a Chroma name is refused before anything connects."""
    from ings_daemon.config import load_settings

    try:
        loaded = load_settings(
            chromadb_auth_token=token, chromadb_auth_header=header, chromadb_tenant=place, chromadb_database=place
        )
    except SystemExit as exc:
        assert token not in str(exc) and "CHROMADB_" in str(exc)
        return
    assert token not in repr(loaded) and token not in str(loaded.model_dump())
    assert loaded.chromadb_tenant == place and len(place) >= 3 and place.isascii() and "/" not in place


async def test_writes_through_one_persona_never_touch_anothers_records(tmp_path: Path) -> None:
    """An update or upsert aimed at a bucket mate's ids through `memory_of(A)` changes
    nothing of theirs, and the index stays right when another instance erased A after this
    one last looked."""
    settings = Settings(chromadb_path=tmp_path / "chroma")
    one, other = Collections(settings), Collections(settings)
    mate = bucket_mate(TECHLEAD)
    await one.add_memories([record(TECHLEAD, 1), record(mate, 2)])
    await one.update_metadata(memory_of(TECHLEAD), [record(mate, 2).id], {"job_id": "hijack"})
    assert (await one.get(memory_of(mate)))[0].metadata.get("job_id") is None
    theirs = record(mate, 2)
    with pytest.raises(ValueError, match="another persona"):
        await one.upsert(memory_of(TECHLEAD), Record(theirs.id, "x", {"persona_id": TECHLEAD}, theirs.embedding))
    assert [r.id for r in await one.get(memory_of(mate))] == [theirs.id]

    assert await other.memory_personas() == sorted([TECHLEAD, mate])
    await one.drop_memory(TECHLEAD)
    await other.add_memories([record(TECHLEAD, 3)])
    assert TECHLEAD in await Collections(settings).memory_personas()
