"""Erasure: `ings.forget` requests and the retention sweep (INGS_MEMORY_RETENTION_DAYS).

An erasure finds the records (a persona's memories, one session's, or named events';
for a whole persona its tune examples and registry entry too), finds the adapter versions
trained on any of them (`storage.erasures`), and returns what should happen: publish an
`ings.adapter-retired` per version and an `ings.forget-result` with the counts (and, for a
whole persona, a tombstone on the compacted `ings.persona`); then, once those are out,
record the erasure in the persona's ledger and delete. Replayed, it finds the records
already gone and the versions already retired: nothing is erased twice. Every read and
delete is filtered by the persona's DID inside its bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Settings
from ..contract.erasure import AdapterRetired, ForgetRequest, ForgetResult
from ..contract.events import TrainJob
from ..contract.ids import answer_ids, digest, interaction_id
from ..runtime import logs, metrics
from ..runtime.deadletters import clean_text
from ..runtime.decode import Incoming, Invalid
from ..runtime.kafka import Ownership, Publish
from ..runtime.kafka import Record as KafkaRecord
from ..runtime.router import Outcome
from ..storage.adapters import AdapterStore
from ..storage.chroma import Collections, Record, memory_of
from ..storage.erasures import ErasureLedger, Reason
from ..storage.personas import load_persona
from .batcher import Batcher
from .personas import training_refusal

DAY_S = 86_400.0
# A sweep round stays well inside a periodic check's 10 s: it stops after this many seconds
# of reading or this many records found; what is left is taken 5 s later.
SWEEP_BUDGET_S = 3.0
SWEEP_BATCH = 1000


@dataclass
class Erasure:
    """What one erasure of one persona removes (`memories` with their metadata)."""

    persona_id: str
    reason: Reason
    scope: Literal["persona", "session", "events", "retention"]
    request_id: str | None
    memories: list[Record] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    whole: bool = False  # the persona itself: every version retired, registry entry removed
    # Which interactions produced before the erasure, but consumed after it, are dropped.
    horizon: dict[str, Any] | None = None
    # Exchanges named whether stored or not: feedback waiting for them goes too.
    named: list[str] = field(default_factory=list)


class Horizons:
    """The erasures an arriving interaction may fall under: a forget is on its own topic,
    so interactions produced before it can still be waiting on theirs. An interaction
    whose Kafka timestamp is not after a forget's, and that the forget names (its persona,
    its session, or its event id), is dropped instead of stored. Read from the ledger once
    per persona, then kept current by this instance's erasures."""

    def __init__(self, ledger: ErasureLedger) -> None:
        self.ledger = ledger
        # Per persona: (scope, before_ms, session_id, event ids as a set: checked per record).
        self.known: dict[str, list[tuple[str, int, str | None, frozenset[str]]]] = {}

    async def load(self, personas: set[str]) -> None:
        """Read the ledgers of the personas not seen yet, all in one worker thread."""
        unseen = sorted(personas - set(self.known))
        if not unseen:
            return
        ledgers = await asyncio.to_thread(lambda: [self.ledger.entries(p) for p in unseen])
        for persona, entries in zip(unseen, ledgers, strict=True):
            self.known[persona] = []
            for e in entries:
                if e.get("horizon"):
                    self.add(persona, e["horizon"])

    def add(self, persona: str, horizon: dict[str, Any]) -> None:
        events = frozenset(horizon.get("event_ids") or ())
        self.known.setdefault(persona, []).append(
            (horizon["scope"], horizon["before_ms"], horizon.get("session_id"), events)
        )

    def erased(self, persona: str, event_id: str, session_id: str | None, timestamp_ms: int | None) -> bool:
        """Whether an interaction (loaded persona) falls under an earlier erasure."""
        for scope, before_ms, session, events in self.known.get(persona, []):
            if timestamp_ms is None or timestamp_ms > before_ms:
                continue
            if scope == "persona" or (scope == "session" and session == session_id):
                return True
            if scope == "events" and event_id in events:
                return True
        return False


class Forgetting:
    """The forget route's handler and the retention sweep, both returning an Outcome."""

    def __init__(
        self,
        settings: Settings,
        collections: Collections,
        batcher: Batcher,
        ownership: Ownership,
        erase_feedback: Callable[[str, list[str] | None], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.erase_feedback = erase_feedback  # feedback waiting for erased exchanges
        self.topics = settings.topics
        self.collections = collections
        self.batcher = batcher
        self.ownership = ownership
        self.ledger = ErasureLedger(AdapterStore(settings.ings_adapter_dir.resolve()))
        self.horizons = Horizons(self.ledger)
        self.next_sweep = 0.0
        self.sweep_bucket = 0  # where an unfinished sweep round goes on

    async def handle(self, items: list[Incoming[ForgetRequest]]) -> Outcome:
        outcome = Outcome()
        for item in items:
            req = item.event
            erasure = Erasure(req.persona_id, "erasure", req.scope, req.request_id)
            stamp = getattr(item.record, "timestamp", None)
            if isinstance(stamp, int):
                erasure.horizon = {"scope": req.scope, "before_ms": stamp, "session_id": req.session_id}
                erasure.horizon["event_ids"] = sorted(set(req.event_ids or []))
            memory = memory_of(req.persona_id)
            if req.scope == "session":
                erasure.memories = await self.collections.get(memory, where={"session_id": req.session_id})
            elif req.scope == "events":
                ids = sorted({interaction_id(req.persona_id, e) for e in req.event_ids or []})
                erasure.memories = await self.collections.get(memory, ids=ids)
                erasure.named = ids
            else:
                erasure.whole = True
                erasure.memories = await self.collections.get(memory)
                found = await self.collections.get("examples", where={"persona_id": req.persona_id})
                erasure.examples = [r.id for r in found]
            outcome.extend(await self.erase(erasure))
        return outcome

    def on_invalid(self, record: KafkaRecord, payload: dict[str, Any] | None, exc: Invalid) -> list[Publish]:
        """A forget that does not validate is answered too: the requester learns it erased nothing."""
        pid, rid = answer_ids(payload)
        scope = (payload or {}).get("scope")
        result = ForgetResult(
            request_id=rid,
            persona_id=pid,
            scope=scope if scope in ("persona", "session", "events") else None,
            memories_deleted=0,
            examples_deleted=0,
            jobs_affected=0,
            adapters_retired=[],
            rejected=clean_text(str(exc)),
        )
        return [Publish(self.topics.forget_result, pid, result)]

    async def sweep(self) -> Outcome:
        """Erase the memories stored more than INGS_MEMORY_RETENTION_DAYS ago, of the
        personas this instance owns, at most every INGS_RETENTION_SWEEP_S."""
        days = self.settings.ings_memory_retention_days
        if not days or time.monotonic() < self.next_sweep:
            return Outcome()
        deadline = time.monotonic() + SWEEP_BUDGET_S
        cutoff = time.time() - days * DAY_S
        outcome = Outcome()
        found = 0
        old_records = self.collections.scan({"ingested_ts": {"$lt": cutoff}}, self.sweep_bucket)
        async with contextlib.aclosing(old_records) as pages:
            async for bucket, page in pages:
                by_persona: dict[str, list[Record]] = {}
                for r in page:
                    if self.ownership.owns(persona := str(r.metadata["persona_id"])):
                        by_persona.setdefault(persona, []).append(r)
                for persona, old in sorted(by_persona.items()):
                    outcome.extend(await self.erase(Erasure(persona, "retention", "retention", None, old)))
                    found += len(old)
                if found >= SWEEP_BATCH or time.monotonic() > deadline:
                    # The round goes on from this bucket at the next check, once these are gone.
                    self.sweep_bucket = bucket
                    return outcome
        self.sweep_bucket = 0
        self.next_sweep = time.monotonic() + self.settings.ings_retention_sweep_s
        return outcome

    async def erase(self, e: Erasure) -> Outcome:
        pid = e.persona_id
        kept: list[Record] = []
        if e.horizon:
            # Produced after the forget (stored earlier in the same fetch): new data, kept.
            before = e.horizon["before_ms"]
            kept = [r for r in e.memories if _produced_ms(r) > before]
            e.memories = [r for r in e.memories if _produced_ms(r) <= before]
        ids = [r.id for r in e.memories]
        # Memories a tune request with include_memory copied into the examples collection.
        e.examples = sorted(set(e.examples) | await self.collections.existing_ids("examples", ids))
        # Auto jobs made but not trained yet that named these memories (the batcher marks them).
        pending = {str(r.metadata.get("job_id")) for r in e.memories if r.metadata.get("job_id")}
        pending -= {str(r.metadata.get("job_id")) for r in e.memories if r.metadata.get("trained_version")}
        # A retention sweep's id is derived from what it erases: a replay is recognised.
        rid = e.request_id or "retention-" + digest("retention", pid, *ids, length=24)
        erased = ids + e.examples
        # The erased ids go to the ledger first: a run that finishes from here on finds them
        # there and retires its own version; one that finished before is found below.
        if (erased or e.horizon) and not await asyncio.to_thread(self.ledger.recorded, pid, rid):
            await asyncio.to_thread(self.ledger.record, pid, e.reason, rid, erased, [], e.horizon)
        if e.horizon:
            self.horizons.add(pid, e.horizon)
        found = await asyncio.to_thread(self.ledger.trained_on, pid, None if e.whole else erased)
        if found:
            await asyncio.to_thread(self.ledger.record, pid, e.reason, rid, [], found)
        # A replay announces again what this erasure retired the first time.
        versions = sorted(set(found) | await asyncio.to_thread(self.ledger.retired, pid, rid))
        retrain = None if e.whole or not found else await self._retrain(pid, rid, ids)
        result = ForgetResult(
            request_id=rid,
            persona_id=pid,
            scope=e.scope,
            memories_deleted=len(ids),
            examples_deleted=len(e.examples),
            jobs_affected=len(pending),
            adapters_retired=versions,
            retrain_job_id=retrain.job_id if retrain else None,
        )
        publish = [
            Publish(
                self.topics.adapter_retired,
                pid,
                AdapterRetired(persona_id=pid, version=v, reason=e.reason, request_id=rid),
            )
            for v in versions
        ]
        publish.append(Publish(self.topics.forget_result, pid, result))
        if e.whole:
            publish.append(Publish(self.topics.persona, pid, None))  # the compacted topic's tombstone
        if retrain is not None:
            publish.append(Publish(self.topics.train_job, pid, retrain))

        async def delete() -> None:
            if e.whole:
                await self.collections.delete("personas", [pid])
            if e.whole and not kept:
                await self.collections.drop_memory(pid)
            else:
                await self.collections.delete(memory_of(pid), ids)
            await self.collections.delete("examples", e.examples)
            # A stored exchange's feedback is in its record; feedback still waiting is not.
            await self.erase_feedback(pid, None if e.whole else sorted({*ids, *e.named}))
            await self.batcher.forget(pid, None if e.whole and not kept else set(ids))
            metrics.MEMORIES_ERASED.labels(reason=e.reason).inc(len(ids) + len(e.examples))
            metrics.ADAPTERS_RETIRED.labels(reason=e.reason).inc(len(found))
            logs.event(
                "erased",
                persona_id=pid,
                reason=e.reason,
                scope=e.scope,
                request_id=rid,
                memories=len(ids),
                examples=len(e.examples),
                adapters_retired=versions,
            )

        return Outcome(publish=publish, then=[delete])

    async def _retrain(self, persona: str, cause: str, erased: list[str]) -> TrainJob | None:
        """With INGS_ERASURE_RETRAIN: a normal (gated) job on the memories that remain, when
        at least INGS_MIN_EXAMPLES do and the persona is trained here at all."""
        s = self.settings
        if not (s.ings_erasure_retrain and s.ings_base_model):
            return None
        document = await load_persona(self.collections, persona)
        if training_refusal(document, s):
            return None
        job = await self.batcher.auto_job(
            persona, [], document.lora_config if document else None, exclude=set(erased), trigger=cause
        )
        return job if len(job.examples.ids) >= s.ings_min_examples else None


def _produced_ms(record: Record) -> int:
    """The memory's Kafka CreateTime (ms); 0 for one stored before it was kept."""
    value = record.metadata.get("produced_ms", 0)
    return value if isinstance(value, int) else 0
