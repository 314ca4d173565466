"""When a persona has enough new examples, and what a train job holds.

A memory record's metadata `job_id` is "" until a train job includes it. The batcher
counts, per persona it owns, the records not yet in a job; at `INGS_MIN_EXAMPLES` of
them, or when the oldest waited `INGS_MAX_WAIT_S`, it publishes one train job. The job
id is derived from those records' ids, so a replay or a restart that sees the same
records names the same job, and the trainer runs it once. The count is rebuilt from
Chroma whenever partitions are assigned, so it survives restarts and rebalances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import logs, metrics
from .bus import Producer
from .config import Settings
from .events import LoraSpec, TrainExample, TrainJob, digest, utcnow
from .memory import Collections, Record, Vector

NEAR_DUPLICATE_COSINE = 0.97


@dataclass(frozen=True)
class Candidate:
    example: TrainExample
    vector: Vector | None


def dedupe(candidates: Sequence[Candidate]) -> list[TrainExample]:
    """Drop exact duplicates, then near duplicates by embedding cosine; first one wins."""
    seen: set[tuple[str, str]] = set()
    kept: list[Candidate] = []
    for c in candidates:
        key = (" ".join(c.example.input.lower().split()), " ".join(c.example.output.lower().split()))
        if key not in seen:
            seen.add(key)
            kept.append(c)
    with_vec = [c for c in kept if c.vector is not None]
    if len(with_vec) < 2:
        return [c.example for c in kept]
    matrix = np.asarray([c.vector for c in with_vec], dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12
    similar = matrix @ matrix.T
    dropped: set[int] = set()
    for i in range(len(with_vec)):
        if i not in dropped:
            later = np.nonzero(similar[i, i + 1 :] >= NEAR_DUPLICATE_COSINE)[0]
            dropped.update(int(j) + i + 1 for j in later)
    near = {id(with_vec[i]) for i in dropped}
    return [c.example for c in kept if id(c) not in near]


def memory_candidate(record: Record) -> Candidate:
    meta = record.metadata
    return Candidate(TrainExample(id=record.id, input=str(meta["input"]), output=str(meta["output"])), record.embedding)


class Batcher:
    def __init__(
        self, settings: Settings, collections: Collections, producer: Producer, owns: Callable[[str], bool]
    ) -> None:
        self.settings = settings
        self.collections = collections
        self.producer = producer
        self.owns = owns
        self.backlog: dict[str, dict[str, float]] = {}  # persona -> record id -> ingested_ts
        self.stale = True
        # The consumer's batches and the periodic max-wait check both drive the batcher.
        self.lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Partitions changed hands: rebuild before the next use (not in the rebalance callback)."""
        self.stale = True

    async def _fresh(self) -> None:
        if self.stale:
            await self.rebuild()
            self.stale = False

    async def rebuild(self) -> None:
        records = await self.collections.get("memory", where={"job_id": ""})
        backlog: dict[str, dict[str, float]] = {}
        for r in records:
            persona = str(r.metadata["persona_id"])
            if self.owns(persona):
                backlog.setdefault(persona, {})[r.id] = float(r.metadata["ingested_ts"])
        self.backlog = backlog
        logs.event("batcher_rebuilt", personas=len(backlog), examples=sum(map(len, backlog.values())))

    async def observe(self, new: Sequence[Record]) -> None:
        async with self.lock:
            await self._fresh()
            for r in new:
                self.backlog.setdefault(str(r.metadata["persona_id"]), {})[r.id] = float(r.metadata["ingested_ts"])
            await self._publish_due({str(r.metadata["persona_id"]) for r in new})

    async def check(self) -> None:
        """The periodic check: publishes jobs whose oldest example waited INGS_MAX_WAIT_S."""
        async with self.lock:
            await self._fresh()
            await self._publish_due(set(self.backlog))

    async def _publish_due(self, personas: set[str]) -> None:
        if not self.settings.ings_base_model:
            return  # nothing to train on: the README says to set INGS_BASE_MODEL
        now = time.time()
        for persona in sorted(personas):
            waiting = self.backlog.get(persona, {})
            due = len(waiting) >= self.settings.ings_min_examples or (
                waiting and now - min(waiting.values()) >= self.settings.ings_max_wait_s
            )
            if due:
                await self._publish(persona, sorted(waiting))

    async def _publish(self, persona: str, trigger_ids: list[str]) -> None:
        job = await self.auto_job(persona, trigger_ids)
        await self.producer.publish(self.settings.topics.train_job, persona, job)
        # Marked only after the job is published: a crash in between republishes the
        # same job id, which the trainer recognises.
        await self.collections.update_metadata("memory", trigger_ids, {"job_id": job.job_id})
        for rid in trigger_ids:
            self.backlog[persona].pop(rid, None)
        metrics.TRAIN_JOBS_PUBLISHED.labels(trigger="auto").inc()
        logs.event("train_job_published", persona_id=persona, job_id=job.job_id, examples=len(job.examples))

    async def auto_job(self, persona: str, trigger_ids: list[str]) -> TrainJob:
        """The persona's newest examples (the triggering ones first), de-duplicated."""
        records = await self.collections.get("memory", where={"persona_id": persona}, embeddings=True)
        fresh = set(trigger_ids)
        records.sort(key=lambda r: (r.id not in fresh, -float(r.metadata["ingested_ts"])))
        examples = dedupe([memory_candidate(r) for r in records])[: self.settings.ings_max_job_examples]
        if not examples:
            logs.event("train_job_empty", logging.WARNING, persona_id=persona)
        return TrainJob(
            job_id="auto-" + digest("auto", persona, *trigger_ids, length=24),
            persona_id=persona,
            trigger="auto",
            base_model=self.settings.ings_base_model,
            lora=LoraSpec(model_name=self.settings.ings_base_model),
            examples=examples,
            created_at=utcnow(),
        )
