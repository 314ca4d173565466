"""When a persona has enough new examples, and what a train job holds.

A memory record's metadata `job_id` is "" until a train job includes it. The batcher
keeps, per persona it owns, the ids of the records not yet in a job and the oldest one's
time; at `INGS_MIN_EXAMPLES` of them, or when the oldest waited `INGS_MAX_WAIT_S`, it
publishes one train job (none for a persona served by an online backend). The job
id is derived from those records' ids, so a replay or a restart that sees the same
records names the same job, and the trainer runs it once. The count is rebuilt from
Chroma whenever the runtime's assignment changes, so it survives restarts and rebalances.
The batcher publishes nothing itself: it returns the jobs due as an `Outcome`.

Feedback labels are counted the same way (`storage.feedback.PREFERENCE_JOB` "" until a job
includes them): INGS_PREFERENCE_MIN_LABELS new labels make a job too, and every job of a
persona with that many labels carries them as its preference set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..basemodels import (
    BaseModelError,
    model_context_length,
    quantization_refusal,
    resolve_base_model,
    within_context,
)
from ..config import Settings
from ..contract.events import ExampleSet, LoraSpec, Persona, TrainExample, TrainJob
from ..contract.examples import Candidate, dedupe, example_set
from ..contract.ids import digest, utcnow
from ..runtime import logs, metrics
from ..runtime.kafka import Ownership, Publish
from ..runtime.router import Outcome
from ..storage import feedback as feedback_keys
from ..storage.chroma import Collections, Record, memory_of
from ..storage.personas import load_persona
from .personas import training_refusal


def ingested_ts(record: Record) -> float:
    """When a memory record was stored (Unix seconds), as the ingest role wrote it."""
    value = record.metadata["ingested_ts"]
    if not isinstance(value, int | float):
        raise TypeError(f"record {record.id} has ingested_ts {value!r}, not a number")
    return float(value)


def memory_candidate(record: Record) -> Candidate:
    meta = record.metadata
    return Candidate(TrainExample(id=record.id, input=str(meta["input"]), output=str(meta["output"])), record.embedding)


@dataclass
class Waiting:
    """One persona's records not yet in a job: their ids, and when the oldest was stored."""

    ids: set[str] = field(default_factory=set)
    oldest: float = math.inf


class Batcher:
    """Counts each owned persona's examples not yet in a job, and says when to train.

    Ownership comes from the runtime (the consumer's assignment); whenever it changes the
    count is rebuilt from Chroma before the next use.
    """

    def __init__(self, settings: Settings, collections: Collections, ownership: Ownership) -> None:
        self.settings = settings
        self.collections = collections
        self.ownership = ownership
        self.backlog: dict[str, Waiting] = {}
        self.labels: dict[str, set[str]] = {}  # per persona, labels not yet in a job
        self.built_for = -1  # the ownership generation the backlog was built for
        # The consumer's batches and the periodic max-wait check both drive the batcher.
        self.lock = asyncio.Lock()

    async def _fresh(self) -> None:
        if self.built_for != self.ownership.generation:
            await self.rebuild()

    async def rebuild(self) -> None:
        generation = self.ownership.generation
        untrained = await self.collections.untrained()
        backlog = {p: Waiting(ids, oldest) for p, (ids, oldest) in untrained.items() if self.ownership.owns(p)}
        labels: dict[str, set[str]] = {}
        async for _, page in self.collections.scan({feedback_keys.PREFERENCE_JOB: ""}):
            for r in page:
                if self.ownership.owns(persona := str(r.metadata["persona_id"])):
                    labels.setdefault(persona, set()).add(r.id)
        self.backlog, self.labels, self.built_for = backlog, labels, generation
        self._count_labels()
        logs.event(
            "batcher_rebuilt",
            personas=len(backlog),
            examples=sum(len(w.ids) for w in backlog.values()),
            labels=sum(len(ids) for ids in labels.values()),
        )

    def _count_labels(self) -> None:
        metrics.PREFERENCE_LABELS_WAITING.set(sum(len(ids) for ids in self.labels.values()))

    async def labels_changed(self, persona: str, labelled: Sequence[str], unlabelled: Sequence[str]) -> Outcome:
        """Count a persona's new labels (`labelled`; `unlabelled`: no longer labels); the
        job now due, to publish."""
        if not self.settings.ings_base_model:
            return Outcome()
        async with self.lock:
            await self._fresh()
            waiting = self.labels.setdefault(persona, set())
            waiting.update(labelled)
            waiting.difference_update(unlabelled)
            if not waiting:
                del self.labels[persona]
            self._count_labels()
            return await self._due({persona})

    async def observe(self, new: Sequence[Record]) -> Outcome:
        """Count newly stored interactions; the jobs now due, to publish."""
        if not self.settings.ings_base_model:
            return Outcome()  # memory only: nothing will train, so nothing is counted
        async with self.lock:
            await self._fresh()
            for r in new:
                waiting = self.backlog.setdefault(str(r.metadata["persona_id"]), Waiting())
                waiting.ids.add(r.id)
                waiting.oldest = min(waiting.oldest, ingested_ts(r))
            return await self._due({str(r.metadata["persona_id"]) for r in new})

    async def check(self) -> Outcome:
        """The periodic check: jobs whose oldest example waited INGS_MAX_WAIT_S."""
        if not self.settings.ings_base_model:
            return Outcome()
        async with self.lock:
            await self._fresh()
            return await self._due(set(self.backlog))

    async def _due(self, personas: set[str]) -> Outcome:
        outcome = Outcome()
        now = time.time()
        for persona in sorted(personas):
            waiting = self.backlog.get(persona, Waiting())
            due = len(waiting.ids) >= self.settings.ings_min_examples or (
                waiting.ids and now - waiting.oldest >= self.settings.ings_max_wait_s
            )
            if not due and len(self.labels.get(persona, ())) < self.settings.ings_preference_min_labels:
                continue
            document = await load_persona(self.collections, persona)
            refusal = training_refusal(document, self.settings)
            if refusal:
                self.backlog.pop(persona, None)  # memory only; counted afresh, never trained
                self.labels.pop(persona, None)
                self._count_labels()
                logs.event("auto_training_skipped", persona_id=persona, reason=refusal)
                continue
            outcome.extend(await self._job(persona, sorted(waiting.ids), document))
        return outcome

    async def _job(self, persona: str, trigger_ids: list[str], document: Persona | None) -> Outcome:
        job = await self.auto_job(persona, trigger_ids, document.lora_config if document else None)
        self.backlog.pop(persona, None)  # every waiting record triggers this job
        self.labels.pop(persona, None)  # and every waiting label is in its preference set
        self._count_labels()

        async def mark() -> None:
            # Marked only after the job is published: a crash in between republishes the
            # same job id (the count is rebuilt from Chroma), which the trainer recognises.
            await self.collections.update_metadata(memory_of(persona), trigger_ids, {"job_id": job.job_id})
            if job.preference is not None:
                await self.collections.update_metadata(
                    memory_of(persona), list(job.preference.ids), {feedback_keys.PREFERENCE_JOB: job.job_id}
                )
            metrics.TRAIN_JOBS_PUBLISHED.labels(trigger="auto").inc()
            logs.event("train_job_published", persona_id=persona, job_id=job.job_id, examples=len(job.examples.ids))

        return Outcome(publish=[Publish(self.settings.topics.train_job, persona, job)], then=[mark])

    async def forget(self, persona: str, ids: set[str] | None) -> None:
        """Stop counting erased records (`ids`; None: all of the persona's)."""
        async with self.lock:
            labels = self.labels.get(persona, set())
            labels.difference_update(ids if ids is not None else labels.copy())
            if not labels:
                self.labels.pop(persona, None)
            self._count_labels()
            waiting = self.backlog.get(persona)
            if waiting is None:
                return
            if ids is None:
                del self.backlog[persona]
            else:
                waiting.ids -= ids
                if not waiting.ids:
                    del self.backlog[persona]

    def _base_model(self, persona: str, wanted: str | None) -> tuple[str, int | None]:
        """An auto job's base model and its context window: the persona's own choice when it
        is allowed and here, else INGS_BASE_MODEL (whose absence the trainer reports)."""
        default = self.settings.ings_base_model
        for name in ([wanted] if wanted and wanted != default else []) + [default]:
            try:
                return name, model_context_length(resolve_base_model(name, self.settings))
            except BaseModelError as exc:
                if name != default:
                    logs.event("persona_base_model_unavailable", logging.WARNING, persona_id=persona, reason=str(exc))
        return default, None

    async def auto_job(
        self,
        persona: str,
        trigger_ids: list[str],
        defaults: LoraSpec | None = None,
        *,
        exclude: set[str] | None = None,
        trigger: str = "auto",
    ) -> TrainJob:
        """The persona's newest examples (the triggering ones first), de-duplicated, trained
        with the persona's own LoRA `defaults` from its handshake where it gave them.
        `exclude` leaves records out (an erasure's, still stored while the job is made);
        `trigger` names what made the job ("auto", or the forget request of a retrain).

        Reads and compares only a window of the newest memories (twice INGS_MAX_JOB_EXAMPLES,
        room for the duplicates dropped), so a job costs the same after 1,000 memories or
        100,000.
        """
        newest = 2 * self.settings.ings_max_job_examples
        records = await self.collections.newest(memory_of(persona), newest, embeddings=True)
        records = [r for r in records if r.id not in (exclude or set())]
        fresh = set(trigger_ids)
        records.sort(key=lambda r: (r.id not in fresh, -ingested_ts(r)))
        examples = dedupe([memory_candidate(r) for r in records])[: self.settings.ings_max_job_examples]
        if not examples:
            logs.event("train_job_empty", logging.WARNING, persona_id=persona)
        model, context = self._base_model(persona, defaults.model_name if defaults else None)
        if defaults and quantization_refusal(defaults.quantization, self.settings):
            logs.event("persona_quantization_dropped", logging.WARNING, persona_id=persona, reason="no CUDA here")
            defaults = defaults.model_copy(update={"quantization": None})
        salt = [] if trigger == "auto" else [trigger]
        claim = example_set("memory", examples)
        labelled = await self._preference_set(persona, exclude or set())
        preference = labelled[0] if labelled else None
        if labelled:
            salt += ["preference", *labelled[0].ids, labelled[0].sha256, *labelled[1]]
        return TrainJob(
            # The content hash too: the same ids with other content (an event id sent again
            # after an erasure) is another job, never the erased one's adapter announced again.
            job_id="auto-" + digest("auto", *salt, persona, *trigger_ids, claim.sha256, length=24),
            preference=preference,
            persona_id=persona,
            trigger=trigger,
            base_model=model,
            lora=within_context((defaults or LoraSpec()).model_copy(update={"model_name": model}), context),
            examples=claim,
            created_at=utcnow(),
        )

    async def _preference_set(self, persona: str, exclude: set[str]) -> tuple[ExampleSet, list[str]] | None:
        """The claim check of the persona's newest labelled memories (at most
        INGS_MAX_JOB_EXAMPLES), when it has at least INGS_PREFERENCE_MIN_LABELS of them, and
        the event ids of their current feedback: new votes on the same memories make
        another job, never the old one announced again."""
        found = await self.collections.get(memory_of(persona), where={feedback_keys.LABELLED: True})
        found = [r for r in found if r.id not in exclude][-self.settings.ings_max_job_examples :]
        if len(found) < self.settings.ings_preference_min_labels:
            return None
        votes = [str(r.metadata.get(feedback_keys.EVENT, "")) for r in found]
        return example_set("memory", [memory_candidate(r).example for r in found]), votes
