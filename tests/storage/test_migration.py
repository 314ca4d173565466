"""A store written in the earlier layout (one collection per persona) moves into persona
buckets on first open, completely, in order, and resumably.

`tests/data/memory-per-persona.tar.gz` is an embedded store made by ings-daemon 5327c4b
through its storage layer: three personas with 30, 5 and 1 memories (written 7 at a time,
the first 5 already in job "j1"), and one registry entry.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import chromadb
import pytest
from conftest import memory_collections

from ings_daemon.config import Settings
from ings_daemon.storage import buckets
from ings_daemon.storage.chroma import Collections, memory_of

DATA = Path(__file__).parent.parent / "data" / "memory-per-persona.tar.gz"
LEGACY = [f"did:nings:artificial:llm:legacy{i}:v1.0:0000000000{i:02d}" for i in range(3)]
COUNTS = [30, 5, 1]


def legacy_store(tmp_path: Path) -> Settings:
    with tarfile.open(DATA) as archive:
        archive.extractall(tmp_path, filter="data")
    return Settings(chromadb_path=tmp_path / "chroma")


def client_of(settings: Settings) -> Any:
    quiet = chromadb.Settings(anonymized_telemetry=False)
    return chromadb.PersistentClient(path=str(settings.chromadb_path), settings=quiet)


async def assert_moved(settings: Settings) -> None:
    collections = Collections(settings)
    assert await collections.memory_personas() == sorted(LEGACY)
    for persona, count in zip(LEGACY, COUNTS, strict=True):
        newest = await collections.newest(memory_of(persona), 10, embeddings=True)
        # The newest window is still the newest records, oldest first.
        assert [r.metadata["input"] for r in newest] == [f"q{n}" for n in range(max(0, count - 10), count)]
        assert all(r.metadata["persona_id"] == persona for r in newest)
        assert int(await collections.call(memory_of(persona), "count")) == count
    found = await collections.query(memory_of(LEGACY[0]), [0.0] * 7 + [1.0] + [0.0] * 376, 1)
    assert found[0].metadata["input"] == "q7" and found[0].document == "input: q7\noutput: a7"
    untrained = await collections.untrained()
    # Each persona's first 5 were in job "j1" and still are.
    assert {p: (len(ids), oldest) for p, (ids, oldest) in untrained.items()} == {LEGACY[0]: (25, 5.0)}
    assert (await collections.get("personas", ids=[LEGACY[0]]))[0].id == LEGACY[0]
    client = client_of(settings)
    names = {c.name for c in client.list_collections()}
    assert not [n for n in names if n.startswith("ings_memory_p_")]
    assert sum(c.count() for c in memory_collections(client)) == sum(COUNTS)  # nothing doubled


async def test_a_per_persona_store_moves_into_buckets_on_first_open(tmp_path: Path) -> None:
    settings = legacy_store(tmp_path)
    assert len(buckets.legacy_sources(client_of(settings), "ings_memory")) == 3
    await assert_moved(settings)


async def test_a_migration_killed_midway_finishes_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run dies after moving one persona's records but before dropping its old
    collection (the worst point: its records are in both places); the next run finishes."""
    settings = legacy_store(tmp_path)
    real_delete = chromadb.api.client.Client.delete_collection
    calls = 0

    def dies_on_the_second(self: Any, name: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt("killed")  # what SIGINT raises, and nothing catches
        real_delete(self, name)

    monkeypatch.setattr(chromadb.api.client.Client, "delete_collection", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        await Collections(settings).memory_personas()
    monkeypatch.setattr(chromadb.api.client.Client, "delete_collection", real_delete)
    assert len(buckets.legacy_sources(client_of(settings), "ings_memory")) == 2
    await assert_moved(settings)


async def test_only_this_stores_earlier_collections_move_and_a_bad_record_does_not_close_it(tmp_path: Path) -> None:
    """Another deployment whose CHROMADB_COLLECTION merely starts with `ings_memory_p_` keeps
    its collections; buckets of another bucket count move; a record with no persona
    anywhere is left out, and the store opens."""
    path = tmp_path / "chroma"
    staging = Collections(Settings(chromadb_path=path, chromadb_collection="ings_memory_p_staging"))
    await staging.add_memories([record_of(LEGACY[0], n) for n in range(3)])
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    wide = client.create_collection("ings_memory_bucket05of64", embedding_function=None)
    wide.add(ids=["w1"], embeddings=[[1.0] + [0.0] * 383], metadatas=[{"persona_id": LEGACY[1], "input": "w"}])
    shared = client.create_collection("ings_memory", embedding_function=None)
    shared.add(
        ids=["nobody", "s1"], embeddings=[[0.0, 1.0] + [0.0] * 382] * 2, metadatas=[{"x": 1}, {"persona_id": LEGACY[2]}]
    )

    mine = Collections(Settings(chromadb_path=path))
    assert await mine.memory_personas() == sorted([LEGACY[1], LEGACY[2]])
    assert [r.id for r in await mine.newest(memory_of(LEGACY[1]), 5)] == ["w1"]
    names = {c.name for c in client.list_collections()}
    assert "ings_memory" not in names and "ings_memory_bucket05of64" not in names
    assert await staging.memory_personas() == [LEGACY[0]]
    assert len(await staging.newest(memory_of(LEGACY[0]), 5)) == 3


def record_of(persona: str, n: int) -> Any:
    from ings_daemon.storage.chroma import Record

    vector = [0.0] * 384
    vector[n] = 1.0
    return Record(f"{persona[-4:]}-{n}", f"q{n}", {"persona_id": persona, "input": f"q{n}"}, vector)
