"""The ingest role's handlers: handshakes, interactions and recall, and its route table."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

from ..config import Settings
from ..contract.erasure import ForgetRequest
from ..contract.events import Handshake, Interaction, Memory, RecallRequest, RecallResult, TuneRequest
from ..contract.examples import Vector, example_text
from ..contract.feedback import Feedback
from ..contract.ids import interaction_id
from ..runtime import logs, metrics
from ..runtime.decode import Incoming
from ..runtime.kafka import Ownership, Publish, message_size
from ..runtime.router import Outcome, Reject, Route
from ..storage import feedback as stored_feedback
from ..storage import metadata as stored_metadata
from ..storage.chroma import Collections, Metadata, memory_of
from ..storage.chroma import Record as MemoryRecord
from ..storage.embedder import Embedder
from . import privacy
from .batcher import Batcher
from .feedback import FeedbackRoute
from .forget import Forgetting
from .personas import Personas
from .tune import TuneRequests

# Embedded records gathered into one Chroma write (see Ingest._embed_and_store).
WRITE_RECORDS = 512
# Model batches in a large batch's last write, the one write the model cannot hide (500
# records took 0.5 s on a `chroma run` server; see write_windows).
LAST_WRITE_BATCHES = 2
T = TypeVar("T")


def interaction_metadata(item: Incoming[Interaction]) -> Metadata:
    e = item.event
    meta: Metadata = {
        "persona_id": e.persona_id,
        "event_id": item.event_id,
        "input": e.input,
        "output": e.output,
        "ingested_ts": time.time(),
        "job_id": "",
        "trained_version": 0,
        "source": "interaction",
    }
    # When the producer wrote it (Kafka's CreateTime, ms): a forget erases what came before it.
    produced = getattr(item.record, "timestamp", None)
    if isinstance(produced, int):
        meta["produced_ms"] = produced
    optional = {"session_id": e.session_id, "mode": e.mode, "occurred_at": e.occurred_at}
    meta.update({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in optional.items() if v})
    if e.metadata:
        meta.update(stored_metadata.flatten(e.metadata))
        meta[stored_metadata.ORIGINAL] = stored_metadata.original(e.metadata)
    return meta


def write_windows(new: list[T], size: int) -> list[list[T]]:
    """`new` cut, in order, into the windows `Ingest._embed_and_store` writes one at a
    time: WRITE_RECORDS each; a last window longer than LAST_WRITE_BATCHES * `size` gives
    that many records a window of their own, if at least WRITE_RECORDS // 4 stay before
    them (below that a write costs about its calls per bucket, and a second one would only
    add them)."""
    starts = list(range(0, len(new), WRITE_RECORDS))
    if not starts:
        return []
    tail = len(new) - LAST_WRITE_BATCHES * size
    if tail - starts[-1] >= WRITE_RECORDS // 4:
        starts.append(tail)
    return [new[a:b] for a, b in zip(starts, [*starts[1:], len(new)], strict=True)]


class Ingest:
    """The ingest role: its handlers, and `routes()`, the topic -> route table."""

    def __init__(self, settings: Settings, collections: Collections, embedder: Embedder, ownership: Ownership) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.collections = collections
        self.embedder = embedder
        self.personas = Personas(collections, embedder, settings.kafka_max_message_bytes)
        self.batcher = Batcher(settings, collections, ownership)
        self.tune = TuneRequests(settings, collections, embedder, self.personas)
        self.feedback = FeedbackRoute(settings, collections, self.batcher, ownership)
        self.forgetting = Forgetting(settings, collections, self.batcher, ownership, self.feedback.erase)
        self.known: set[str] | None = None  # personas with a memory collection, read once

    def routes(self) -> dict[str, Route[Any]]:
        # Handshakes first: the router processes a batch's topics in this order.
        return {
            self.topics.handshake: Route(Handshake, self.handshakes),
            self.topics.interaction: Route(Interaction, self.interactions),
            self.topics.tune_request: Route(TuneRequest, self.tune.handle, self.tune.on_invalid),
            self.topics.recall_request: Route(RecallRequest, self.recalls),
            self.topics.forget: Route(ForgetRequest, self.forget, self.forgetting.on_invalid),
            self.topics.feedback: Route(Feedback, self.feedback.handle),
        }

    async def forget(self, items: list[Incoming[ForgetRequest]]) -> Outcome:
        if self.known is not None:  # an erased persona no longer counts against INGS_MAX_PERSONAS
            self.known -= {i.event.persona_id for i in items if i.event.scope == "persona"}
        return await self.forgetting.handle(items)

    async def handshakes(self, items: list[Incoming[Handshake]]) -> Outcome:
        stored, rejected = await self.personas.register(items)
        for p in stored:
            logs.event("persona_registered", persona_id=p.persona_id, minted=p.minted)
        return Outcome(publish=[Publish(self.topics.persona, p.persona_id, p) for p in stored], reject=rejected)

    async def _admitted(self, personas: set[str]) -> set[str]:
        """The personas that may keep memory: those that already do, and new ones while
        fewer than INGS_MAX_PERSONAS have (the memory index lists them)."""
        if self.known is None:
            self.known = set(await self.collections.memory_personas())
        for persona in sorted(personas - self.known):
            if len(self.known) < self.settings.ings_max_personas:
                self.known.add(persona)
        return personas & self.known

    async def interactions(self, items: list[Incoming[Interaction]]) -> Outcome:
        horizons = self.forgetting.horizons
        await horizons.load({i.event.persona_id for i in items})
        kept = [
            i
            for i in items
            if not horizons.erased(
                i.event.persona_id, i.event_id, i.event.session_id, getattr(i.record, "timestamp", None)
            )
        ]
        if len(kept) < len(items):  # produced before a forget that named them, consumed after it
            logs.event("interactions_dropped_as_erased", count=len(items) - len(kept))
            items = kept
        if self.settings.ings_redact_pii:
            items = await privacy.redacted(items, privacy.interaction)
        admitted = await self._admitted({i.event.persona_id for i in items})
        limit = self.settings.ings_max_personas
        refused = [
            Reject(i.record, "persona_limit", f"{limit} personas already keep memory (INGS_MAX_PERSONAS)")
            for i in items
            if i.event.persona_id not in admitted
        ]
        by_id = {interaction_id(i.event.persona_id, i.event_id): i for i in items if i.event.persona_id in admitted}
        by_persona: dict[str, list[str]] = {}
        for rid, item in by_id.items():
            by_persona.setdefault(item.event.persona_id, []).append(rid)
        # Only new records are embedded: a replay costs a lookup, not a model call. Stored
        # records not yet in a job are counted again (the batcher's count is a set): a retry
        # after a write that failed mid-batch must not leave the first half uncounted.
        stored = {r.id: r for r in await self.collections.stored_memories(by_persona)}
        new = [(rid, item) for rid, item in by_id.items() if rid not in stored]
        waiting = [r for r in stored.values() if r.metadata.get("job_id") == ""]
        records = await self._embed_and_store(new)
        outcome = await self.batcher.observe(records + waiting)
        # Stored ones too: a retry after a write that failed mid-batch finds its first
        # records stored, and feedback waiting on them must not wait out its time.
        outcome.extend(await self.feedback.on_stored(records + list(stored.values())))
        outcome.reject += refused
        return outcome

    async def _embed_and_store(self, new: list[tuple[str, Incoming[Interaction]]]) -> list[MemoryRecord]:
        """Embed `new` and write it to Chroma, one window of records at a time, each window
        written while the model embeds the next.

        A write is one call per persona bucket it touches, about 13 ms each on a `chroma
        run` server, however few records go to a bucket (`bench/personas_bench.py`). Windows
        are therefore WRITE_RECORDS records (or what is left): a batch spread over
        thousands of personas then costs about as many calls per record as one for a single
        persona, and every write but the last is hidden behind the model. A large batch's
        last LAST_WRITE_BATCHES model batches are a window of their own, so the last write,
        the one nothing hides, is small.

        Windows are consecutive in arrival order and each is written in arrival order, so
        Chroma's insertion order and `ingested_ts` stay the order of the events (what
        `Collections.newest` and the batcher's newest-first jobs rely on). Within a window
        the model gets the texts sorted by length, as sentence-transformers sorts one
        `encode` call: a model batch is padded to its longest text, and chunks of 64 texts
        of 25-70 words in arrival order ran at 70 texts/s against 94/s sorted
        (all-MiniLM-L6-v2, float32, 2 cores; `bench/ingest_bench.py` has the figures).
        """
        size = self.embedder.batch_size
        records: list[MemoryRecord] = []
        write: asyncio.Task[None] | None = None
        try:
            for window in write_windows(new, size):
                documents = [example_text(item.event.input, item.event.output) for _, item in window]
                vectors: list[Vector | None] = [None] * len(window)
                by_length = sorted(range(len(window)), key=lambda i: len(documents[i]))
                for start in range(0, len(by_length), size):
                    chunk = by_length[start : start + size]
                    for i, vector in zip(chunk, await self.embedder.embed([documents[i] for i in chunk]), strict=True):
                        vectors[i] = vector
                built = [
                    MemoryRecord(id=rid, document=doc, metadata=interaction_metadata(item), embedding=vector)
                    for (rid, item), doc, vector in zip(window, documents, vectors, strict=True)
                ]
                if write is not None:
                    await write
                write = asyncio.create_task(self._store(built))
                records += built
            if write is not None:
                await write
        except BaseException:
            if write is not None:
                await asyncio.wait({write})  # let it end; the first failure is the one reported
                if not write.cancelled():
                    write.exception()
            raise
        return records

    async def _store(self, records: list[MemoryRecord]) -> None:
        await self.collections.add_memories(records)
        metrics.MEMORY_RECORDS_ADDED.inc(len(records))
        metrics.MEMORY_LAST_ADDED.set(time.time())

    async def recalls(self, items: list[Incoming[RecallRequest]]) -> Outcome:
        vectors = await self.embedder.embed([i.event.query for i in items])
        outcome = Outcome()
        for item, vector in zip(items, vectors, strict=True):
            req = item.event
            found = await stored_feedback.recall(
                self.collections, memory_of(req.persona_id), vector, req.k, self.settings.ings_recall_feedback_boost
            )
            memories = [
                Memory(
                    id=r.id,
                    persona_id=req.persona_id,
                    input=str(r.metadata["input"]),
                    output=str(r.metadata["output"]),
                    score=round(1.0 - (r.distance or 0.0), 6),
                    session_id=_opt(r.metadata.get("session_id")),
                    mode=_opt(r.metadata.get("mode")),
                    occurred_at=_opt(r.metadata.get("occurred_at")),
                    metadata=stored_metadata.restored(r.metadata),
                    feedback=stored_feedback.label_of(r.metadata),
                    correction=str(r.metadata.get(stored_feedback.CORRECTION) or "") or None,
                )
                for r in found
            ]
            result = self._fitting(
                RecallResult(request_id=req.request_id, persona_id=req.persona_id, query=req.query, results=memories)
            )
            outcome.publish.append(Publish(self.topics.recall_result, req.persona_id, result))
        return outcome

    def _fitting(self, result: RecallResult) -> RecallResult:
        """`result` with its lowest-scored memories left out until it fits one Kafka message
        (each memory can be 32,000 characters of text and 16,000 of metadata)."""
        limit = self.settings.kafka_max_message_bytes
        while result.results:
            size = message_size(result.persona_id.encode(), result.model_dump_json().encode())
            if size <= limit:
                break
            # Cut in proportion to the overshoot: a few serialisations, not one per memory.
            keep = min(len(result.results) - 1, len(result.results) * limit // size)
            result = result.model_copy(update={"results": result.results[:keep], "truncated": True})
        return result


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
