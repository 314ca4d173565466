"""The ingest role's handlers: handshakes, interactions, recall and tune requests."""

from __future__ import annotations

import logging
import time
from typing import Any

from . import logs, metrics
from .batching import Batcher, Candidate, dedupe, memory_candidate
from .bus import Producer, Record
from .config import Settings
from .events import (
    DID_RE,
    Handshake,
    Interaction,
    Memory,
    RecallRequest,
    RecallResult,
    TrainExample,
    TrainJob,
    TuneRequest,
    TuneStatus,
    digest,
    utcnow,
)
from .memory import Collections, Embedder, Metadata
from .memory import Record as MemoryRecord
from .personas import Personas
from .routing import Incoming, Invalid
from .training.basemodels import BaseModelError, resolve_base_model


def interaction_id(persona_id: str, event_id: str) -> str:
    return digest("interaction", persona_id, event_id)


def interaction_document(event: Interaction) -> str:
    return f"input: {event.input}\noutput: {event.output}"


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
    optional = {"session_id": e.session_id, "mode": e.mode, "occurred_at": e.occurred_at}
    meta.update({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in optional.items() if v})
    meta.update({f"meta.{k}": v for k, v in e.metadata.items()})
    return meta


class Ingest:
    def __init__(
        self,
        settings: Settings,
        collections: Collections,
        embedder: Embedder,
        personas: Personas,
        producer: Producer,
        batcher: Batcher,
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.collections = collections
        self.embedder = embedder
        self.personas = personas
        self.producer = producer
        self.batcher = batcher

    async def handshakes(self, items: list[Incoming[Handshake]]) -> None:
        stored = await self.personas.register(items)
        await self.producer.publish_many((self.topics.persona, p.persona_id, p) for p in stored)
        for p in stored:
            logs.event("persona_registered", persona_id=p.persona_id, minted=p.minted)

    async def interactions(self, items: list[Incoming[Interaction]]) -> None:
        by_id = {interaction_id(i.event.persona_id, i.event_id): i for i in items}
        # Only new records are embedded: a replay costs a lookup, not a model call.
        stored = await self.collections.existing_ids("memory", list(by_id))
        new_ids = [rid for rid in by_id if rid not in stored]
        documents = [interaction_document(by_id[rid].event) for rid in new_ids]
        vectors = await self.embedder.embed(documents)
        records = [
            MemoryRecord(id=rid, document=doc, metadata=interaction_metadata(by_id[rid]), embedding=vec)
            for rid, doc, vec in zip(new_ids, documents, vectors, strict=True)
        ]
        await self.collections.add("memory", records)
        metrics.MEMORY_RECORDS_ADDED.inc(len(records))
        await self.batcher.observe(records)

    async def recalls(self, items: list[Incoming[RecallRequest]]) -> None:
        vectors = await self.embedder.embed([i.event.query for i in items])
        results = []
        for item, vector in zip(items, vectors, strict=True):
            req = item.event
            found = await self.collections.query("memory", vector, req.k, {"persona_id": req.persona_id})
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
                )
                for r in found
            ]
            results.append(
                RecallResult(
                    request_id=req.request_id, persona_id=req.persona_id, query=req.query, results=memories
                )
            )
        await self.producer.publish_many((self.topics.recall_result, r.persona_id, r) for r in results)

    async def tune_requests(self, items: list[Incoming[TuneRequest]]) -> None:
        for item in items:
            req = item.event
            request_id = req.request_id or item.event_id
            try:
                job = await self._tune_job(req, request_id)
            except Invalid as exc:
                await self._status(req.persona_id, request_id, "rejected", None, str(exc))
                logs.event("tune_rejected", logging.WARNING, persona_id=req.persona_id, reason=str(exc))
                continue
            await self.producer.publish(self.topics.train_job, req.persona_id, job)
            metrics.TRAIN_JOBS_PUBLISHED.labels(trigger="request").inc()
            await self._status(req.persona_id, request_id, "accepted", job.job_id, None)
            logs.event(
                "tune_accepted", persona_id=req.persona_id, job_id=job.job_id, examples=len(job.examples)
            )

    async def tune_invalid(self, record: Record, payload: dict[str, Any] | None, exc: Invalid) -> None:
        """A tune request that failed validation is answered `rejected`, not only dead-lettered."""
        payload = payload or {}
        pid = payload.get("persona_id")
        request_id = payload.get("request_id") or payload.get("event_id")
        await self._status(
            pid if isinstance(pid, str) and DID_RE.fullmatch(pid) else None,
            request_id if isinstance(request_id, str) else None,
            "rejected",
            None,
            str(exc),
        )

    async def _tune_job(self, req: TuneRequest, request_id: str) -> TrainJob:
        if await self.personas.get(req.persona_id) is None:
            raise Invalid("unknown_persona", f"unknown persona {req.persona_id}: send its handshake first")
        model = req.lora_config.model_name or self.settings.ings_base_model
        if not model:
            raise Invalid("no_base_model", "no base model: set lora_config.model_name or INGS_BASE_MODEL")
        try:
            resolve_base_model(model, self.settings)
        except BaseModelError as exc:
            raise Invalid("base_model", str(exc)) from None
        if len(req.training_data) > self.settings.ings_max_job_examples:
            raise Invalid(
                "too_many_examples",
                f"{len(req.training_data)} examples; the limit is {self.settings.ings_max_job_examples}"
                " per request (INGS_MAX_JOB_EXAMPLES)",
            )
        given = [
            TrainExample(
                id=digest("tune", request_id, str(n), ex.input, ex.output), input=ex.input, output=ex.output
            )
            for n, ex in enumerate(req.training_data)
        ]
        vectors = await self.embedder.embed([f"input: {e.input}\noutput: {e.output}" for e in given])
        candidates = [Candidate(e, v) for e, v in zip(given, vectors, strict=True)]
        if req.include_memory:
            stored = await self.collections.get(
                "memory", where={"persona_id": req.persona_id}, embeddings=True
            )
            candidates += [memory_candidate(r) for r in stored]
        examples = dedupe(candidates)[: self.settings.ings_max_job_examples]
        if len(examples) < self.settings.ings_min_examples:
            raise Invalid(
                "too_few_examples",
                f"{len(examples)} examples after de-duplication; at least {self.settings.ings_min_examples} "
                "are needed (INGS_MIN_EXAMPLES)",
            )
        return TrainJob(
            job_id="req-" + digest("request", req.persona_id, request_id, length=24),
            persona_id=req.persona_id,
            trigger=request_id,
            base_model=model,
            lora=req.lora_config.model_copy(update={"model_name": model}),
            examples=examples,
            created_at=utcnow(),
        )

    async def _status(
        self,
        persona_id: str | None,
        request_id: str | None,
        status: str,
        job_id: str | None,
        reason: str | None,
    ) -> None:
        event = TuneStatus.model_validate(
            {
                "persona_id": persona_id,
                "request_id": request_id,
                "status": status,
                "job_id": job_id,
                "reason": reason,
            }
        )
        await self.producer.publish(self.topics.tune_status, persona_id, event)


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
