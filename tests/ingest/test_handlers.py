"""The interaction handler on embedded Chroma and the real embedding model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from conftest import TECHLEAD, FakeRecord
from hypothesis import given
from hypothesis import strategies as st

from ings_daemon.config import Settings
from ings_daemon.contract.events import Interaction, TrainJob
from ings_daemon.ingest.handlers import Ingest
from ings_daemon.runtime.decode import Incoming
from ings_daemon.runtime.kafka import Ownership
from ings_daemon.storage.embedder import Embedder


def chats(n: int) -> list[Incoming[Interaction]]:
    return [
        Incoming(
            FakeRecord(None, offset=i),
            Interaction(persona_id=TECHLEAD, input=f"Question {i}?", output=f"Answer {i}, plainly."),
            f"chat-{i}",
            {},
        )
        for i in range(n)
    ]


async def test_a_batch_retried_after_a_partial_write_counts_every_record(tmp_path: Path, models_dir: Path) -> None:
    """The first half of a batch was stored before a write failed; the retry stores the rest
    and the batcher counts all of them, so the job is due now, not after a restart."""
    settings = Settings(
        chromadb_path=tmp_path / "chroma",
        ings_models_dir=models_dir,
        ings_base_model="tiny-llama",
        ings_min_examples=20,
    )
    from ings_daemon.storage.chroma import Collections

    ownership = Ownership(settings.topics.interaction)
    ownership.assign([TopicPartition(settings.topics.interaction, p) for p in range(3)], 3)
    batch = chats(20)
    first = Ingest(settings, Collections(settings), Embedder(None, 8, "float32"), ownership)
    assert (await first.interactions(batch[:12])).publish == []  # 12 < 20: nothing due yet

    # A fresh handler (its count lost with the failed attempt) retries the whole batch.
    retry = Ingest(settings, Collections(settings), first.embedder, ownership)
    retry.batcher.built_for = ownership.generation  # as after the crash: nothing rebuilt
    outcome = await retry.interactions(batch)
    jobs = [p.event for p in outcome.publish if isinstance(p.event, TrainJob)]
    assert len(jobs) == 1  # only the 8 new ones counted would be 8 < 20: no job


async def test_new_personas_beyond_the_limit_are_refused_not_stored(tmp_path: Path) -> None:
    """A producer inventing DIDs cannot make collections (and their RAM) without bound:
    interactions for new personas past INGS_MAX_PERSONAS are dead-lettered as persona_limit;
    personas that already keep memory go on as before."""
    from ings_daemon.storage.chroma import Collections

    settings = Settings(chromadb_path=tmp_path / "chroma", ings_base_model="", ings_max_personas=2)
    ownership = Ownership(settings.topics.interaction)
    dids = [f"did:nings:artificial:llm:p{i}:v1.0:00000000000{i}" for i in range(3)]

    def one(did: str, n: int) -> Incoming[Interaction]:
        event = Interaction(persona_id=did, input=f"q {did} {n}", output=f"a {n}")
        return Incoming(FakeRecord(None, offset=n), event, f"{did}-{n}", {})

    ingest = Ingest(settings, Collections(settings), Embedder(None, 8, "float32"), ownership)
    outcome = await ingest.interactions([one(did, 0) for did in dids])
    assert [(r.error_type, r.record.offset) for r in outcome.reject] == [("persona_limit", 0)]
    assert "INGS_MAX_PERSONAS" in outcome.reject[0].reason
    # A restarted daemon reads who keeps memory: the two admitted go on, the third is refused.
    again = Ingest(settings, Collections(settings), ingest.embedder, ownership)
    later = await again.interactions([one(did, 1) for did in dids])
    assert len(later.reject) == 1 and await again.collections.memory_personas() == sorted(dids[:2])


async def test_a_batch_is_embedded_by_length_stored_in_arrival_order_with_a_small_last_write(
    tmp_path: Path,
) -> None:
    """Texts of mixed length go to the model in length order within each write window (a
    model batch is padded to its longest text); every stored vector is still its own
    record's; Chroma holds the records in arrival order with `ingested_ts` rising, so a
    job's "newest" are the latest events, not the longest; a large batch's last write,
    the one the model cannot hide, carries LAST_WRITE_BATCHES model batches; a small batch
    is one write."""
    import numpy as np

    from ings_daemon.ingest.handlers import LAST_WRITE_BATCHES, WRITE_RECORDS
    from ings_daemon.storage import buckets
    from ings_daemon.storage.chroma import Collections, memory_of

    settings = Settings(chromadb_path=tmp_path / "chroma", ings_base_model="")
    embedder = Embedder(None, 8, "float32")
    ingest = Ingest(settings, Collections(settings), embedder, Ownership(settings.topics.interaction))
    embedded: list[list[str]] = []
    written: list[int] = []
    embed, add = embedder.embed, ingest.collections.add_memories

    async def spy_embed(texts: Sequence[str]) -> list[list[float]]:
        embedded.append(list(texts))
        return await embed(texts)

    async def spy_add(records: list[Any]) -> None:
        written.append(len(records))
        await add(records)

    embedder.embed = spy_embed  # type: ignore[method-assign]
    ingest.collections.add_memories = spy_add  # type: ignore[method-assign]
    n = WRITE_RECORDS + WRITE_RECORDS // 4 + 37  # a full window, a large last one that is split
    items = [
        Incoming(
            FakeRecord(None, offset=i),
            Interaction(persona_id=TECHLEAD, input=f"Question {i}?", output=" ".join(["word"] * ((i * 7) % 40 + 1))),
            f"mixed-{i}",
            {},
        )
        for i in range(n)
    ]
    await ingest.interactions(items)

    tail = LAST_WRITE_BATCHES * embedder.batch_size
    assert written == [WRITE_RECORDS, n - WRITE_RECORDS - tail, tail]
    calls = iter(embedded)
    for size in written:  # each window's texts reach the model sorted by length
        window: list[int] = []
        while len(window) < size:
            window += [len(text) for text in next(calls)]
        assert len(window) == size and window == sorted(window)
    got = ingest.collections._bucket(buckets.bucket_of(TECHLEAD)).get(
        where={"persona_id": TECHLEAD}, include=["documents", "embeddings", "metadatas"]
    )
    assert [m["event_id"] for m in got["metadatas"]] == [f"mixed-{i}" for i in range(n)]
    stamps = [float(m["ingested_ts"]) for m in got["metadatas"]]
    assert stamps == sorted(stamps)
    again = embedder.encode(list(got["documents"]))
    for doc, meta, vector, expected in zip(got["documents"], got["metadatas"], got["embeddings"], again, strict=True):
        assert str(meta["input"]) in doc and str(meta["output"]) in doc
        assert float(np.dot(vector, expected)) > 0.9999
    newest = await ingest.collections.newest(memory_of(TECHLEAD), 5)
    assert [r.metadata["event_id"] for r in newest] == [f"mixed-{i}" for i in range(n - 5, n)]

    written.clear()
    await ingest.interactions(items)  # a replay: nothing to embed, nothing written
    assert written == []
    await ingest.interactions([Incoming(i.record, i.event, f"small-{k}", {}) for k, i in enumerate(items[:40])])
    assert written == [40]


@given(n=st.integers(0, 5000), size=st.integers(1, 256))
def test_write_windows_cover_the_batch_in_order_with_a_small_last_one_when_large(n: int, size: int) -> None:
    """Any batch (a replay leaves none to embed) is cut into consecutive windows that add
    up to it in order: none empty, none over WRITE_RECORDS, and the last one of a batch
    whose last WRITE_RECORDS-window is large is at most LAST_WRITE_BATCHES model batches."""
    from ings_daemon.ingest.handlers import LAST_WRITE_BATCHES, WRITE_RECORDS, write_windows

    windows = write_windows(list(range(n)), size)
    assert [i for w in windows for i in w] == list(range(n))
    assert all(0 < len(w) <= WRITE_RECORDS for w in windows)
    tail = LAST_WRITE_BATCHES * size
    if n and (n - 1) % WRITE_RECORDS + 1 >= tail + WRITE_RECORDS // 4:
        assert len(windows[-1]) == tail
