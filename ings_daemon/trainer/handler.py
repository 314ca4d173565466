"""The trainer role: one train job at a time, from `ings.train-job` to `ings.adapter-ready`.

The run happens in the worker process; this side checks the job, reads its examples by
claim check, moves the finished adapter into the store and returns the announcement for
the runtime to publish. The runtime commits the job's offset only after that, so a crash
before the announcement replays the job, and the store's job index makes the replay cheap.
A job stopped by the daemon's own shutdown is left uncommitted, to run again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from ..basemodels import BaseModelError, resolve_base_model, serving_refusal
from ..config import Settings
from ..contract.erasure import AdapterRetired
from ..contract.events import (
    AdapterMetrics,
    AdapterReady,
    GateDecision,
    LoraSpec,
    TrainExample,
    TrainJob,
    TuneState,
    TuneStatus,
)
from ..contract.ids import utcnow
from ..runtime import logs, metrics
from ..runtime.decode import Incoming
from ..runtime.kafka import Publish
from ..runtime.router import Outcome, Route
from ..storage.adapters import AdapterStore
from ..storage.chroma import Collections, memory_of
from ..storage.erasures import ErasureLedger, Reason
from ..storage.examples import ExamplesUnavailable, load_examples
from ..storage.personas import load_persona
from .gate import GateFigures, GateLimits
from .worker import TrainingWorker, WorkRequest

PROGRESS_EVERY_S = 2.0
# Sends a progress event at once, best effort: the runtime's, so handlers never hold a producer.
Notify = Callable[[Publish], Awaitable[None]]


class Trainer:
    def __init__(self, settings: Settings, collections: Collections, notify: Notify) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.collections = collections
        self.notify = notify
        self.store = AdapterStore(settings.ings_adapter_dir.resolve())
        self.ledger = ErasureLedger(self.store)
        self.worker = TrainingWorker()
        self.running = 0
        self.stopping = False

    def routes(self) -> dict[str, Route[Any]]:
        return {self.topics.train_job: Route(TrainJob, self.handle)}

    async def close(self) -> None:
        """Stop the run in progress, if any, and the worker: the daemon calls this first on
        shutdown, so the job is not waited for; it stays uncommitted and runs again."""
        self.stopping = True
        await self.worker.close()

    async def handle(self, items: list[Incoming[TrainJob]]) -> Outcome:
        outcome = Outcome()
        for item in items:
            done = await self.run_job(item.event)
            if done is None:
                outcome.defer.append(item.record)
            else:
                outcome.extend(done)
        return outcome

    def status(self, job: TrainJob, status: TuneState, **fields: Any) -> Publish:
        event = TuneStatus(
            persona_id=job.persona_id,
            status=status,
            job_id=job.job_id,
            request_id=None if job.trigger == "auto" else job.trigger,
            **fields,
        )
        return Publish(self.topics.tune_status, job.persona_id, event)

    def _failed(self, job: TrainJob, outcome: str, reason: str, advice: str | None = None, **gate: Any) -> Outcome:
        metrics.TRAINING_RUNS.labels(outcome=outcome).inc()
        logs.event("training_failed", logging.WARNING, persona_id=job.persona_id, job_id=job.job_id, reason=reason)
        return Outcome(publish=[self.status(job, "failed", reason=reason, advice=advice, **gate)])

    async def run_job(self, job: TrainJob) -> Outcome | None:
        """Train one job; its outcome, or None when shutdown stopped it (run it again)."""
        done = self.store.find_job(job.persona_id, job.job_id)
        if done is not None:
            if done in await asyncio.to_thread(self.ledger.retired, job.persona_id):
                return self._failed(job, "rejected", f"this job made v{done}, since retired by an erasure")
            return self._announce_again(job, done)
        try:
            if job.base_model not in self.settings.allowed_base_models():
                raise BaseModelError(f"base model {job.base_model!r} is not allowed (INGS_ALLOWED_BASE_MODELS)")
            if refusal := serving_refusal(job.lora, self.settings):
                raise BaseModelError(refusal)
            base_path = resolve_base_model(job.base_model, self.settings)
            erased = frozenset(await asyncio.to_thread(self.ledger.erased_ids, job.persona_id))
            examples, left_out = await load_examples(self.collections, job.persona_id, job.examples, erased)
            if left_out and len(examples) < self.settings.ings_min_examples:
                raise ExamplesUnavailable(
                    f"{left_out} of the job's {len(job.examples.ids)} examples were erased; {len(examples)} remain,"
                    f" fewer than INGS_MIN_EXAMPLES ({self.settings.ings_min_examples}): the job is dropped"
                )
            persona = await load_persona(self.collections, job.persona_id)
        except (BaseModelError, ExamplesUnavailable) as exc:
            return self._failed(job, "rejected", str(exc))
        preference = await self._labelled(job, erased)
        if left_out:
            logs.event("train_job_without_erased", persona_id=job.persona_id, job_id=job.job_id, erased=left_out)
        await self.notify(self.status(job, "started"))
        # A retired version (trained on erased data) is no baseline for the next one.
        retired = frozenset(await asyncio.to_thread(self.ledger.retired, job.persona_id))
        previous, previous_trained = self.store.latest_on(job.persona_id, job.base_model, retired) or (
            None,
            frozenset(),
        )
        if self.stopping:  # shutdown began while the job was prepared; nothing awaits from here to the run
            return None
        self.running = 1
        metrics.TRAINING_IN_PROGRESS.set(1)
        started = time.perf_counter()
        # Runs that died with another trainer sharing the store are swept before each job,
        # not only at start-up.
        self.store.cleanup_tmp()
        tmp_dir = self.store.new_tmp_dir(job.persona_id)
        last_sent = 0.0

        async def on_progress(step: int, total: int, loss: float) -> None:
            nonlocal last_sent
            metrics.TRAINING_LAST_LOSS.set(loss)
            if time.monotonic() - last_sent >= PROGRESS_EVERY_S or step == total:
                last_sent = time.monotonic()
                await self.notify(self.status(job, "progress", step=step, total_steps=total, loss=loss))

        try:
            outcome = await self.worker.run(
                WorkRequest(
                    job=job,
                    examples=examples,
                    base_model_path=base_path,
                    tmp_dir=tmp_dir,
                    previous_adapter=self.store.version_path(job.persona_id, previous) if previous else None,
                    previous_version=previous,
                    gate=GateLimits(
                        self.settings.ings_quality_gate,
                        self.settings.ings_gate_min_learned,
                        self.settings.ings_gate_max_retention_kl,
                        self.settings.ings_gate_min_preference,
                    ),
                    device=self.settings.ings_train_device,
                    gradient_checkpointing=self.settings.ings_gradient_checkpointing,
                    system=persona.description if persona and persona.description else None,
                    previous_trained=previous_trained,
                    gate_min_examples=self.settings.ings_gate_min_examples,
                    preference=preference,
                ),
                on_progress,
                timeout_s=self.settings.ings_train_timeout_s or None,
            )
        finally:
            self.running = 0
            metrics.TRAINING_IN_PROGRESS.set(0)
            metrics.TRAINING_SECONDS.observe(time.perf_counter() - started)
        if outcome.error_type == "WorkerStopped":
            self.store.discard(tmp_dir)
            return None
        if not outcome.ok or outcome.metrics is None:
            self.store.discard(tmp_dir)
            gate: dict[str, Any] = {}
            if outcome.gate_figures is not None:
                _count_gate("failed", outcome.gate_figures)
                gate = {"gate": "failed", **outcome.gate_figures.fields()}
            return self._failed(job, "failed", outcome.reason or "training failed", outcome.advice, **gate)
        done = self.store.find_job(job.persona_id, job.job_id)
        if done is not None:
            # Another trainer finished the same job meanwhile (after a rebalance): keep one.
            self.store.discard(tmp_dir)
            return self._announce_again(job, done)
        version = self.store.publish(job.persona_id, tmp_dir)
        metrics.TRAINING_RUNS.labels(outcome="succeeded").inc()
        run = outcome.metrics
        _count_gate(run.gate, figures_of(run))
        if run.preference_gate is not None:
            metrics.PREFERENCE_RUNS.labels(objective=run.objective, gate=run.preference_gate).inc()
            if run.preference_accuracy is not None:
                metrics.PREFERENCE_ACCURACY.set(run.preference_accuracy)
        metrics.TRAINING_EXAMPLES.inc(outcome.metrics.examples)
        metrics.TRAINING_TOKENS.inc(outcome.metrics.tokens)
        metrics.TRAINING_LAST_LOSS.set(outcome.metrics.train_loss_last)
        logs.event(
            "adapter_published",
            persona_id=job.persona_id,
            job_id=job.job_id,
            version=version,
            loss_first=outcome.metrics.train_loss_first,
            loss_last=outcome.metrics.train_loss_last,
            base_load_s=round(outcome.base_model_loaded_s, 3),
            worker_rss=outcome.worker_rss_bytes,
        )
        # Examples erased while this run trained: the new version is retired at once and never
        # announced ready. Only erasures since the job was made count: an id erased before and
        # sent again is new data.
        cause = await asyncio.to_thread(self._erased_during, job, version)
        if cause is not None:
            rid, reason = cause
            await asyncio.to_thread(self.ledger.record, job.persona_id, reason, rid, [], [version])
            metrics.ADAPTERS_RETIRED.labels(reason=reason).inc()
            notice = AdapterRetired(persona_id=job.persona_id, version=version, reason=reason, request_id=rid)
            why = f"v{version} was trained on examples erased while it ran ({rid}): retired, not announced"
            logs.event(
                "adapter_retired_at_once", logging.WARNING, persona_id=job.persona_id, version=version, cause=rid
            )
            return Outcome(
                publish=[
                    Publish(self.topics.adapter_retired, job.persona_id, notice),
                    self.status(job, "failed", reason=why, version=version),
                ]
            )
        return self._announce(job, version, outcome.metrics)

    async def _labelled(self, job: TrainJob, erased: frozenset[str]) -> list[TrainExample]:
        """The job's preference set with its current feedback; a set that can no longer be
        read as the job named it is left out (the run is supervised only), not the job."""
        if job.preference is None:
            return []
        try:
            labelled, _ = await load_examples(self.collections, job.persona_id, job.preference, erased)
        except ExamplesUnavailable as exc:
            logs.event("preference_set_unavailable", logging.WARNING, persona_id=job.persona_id, reason=str(exc))
            return []
        return labelled

    def _erased_during(self, job: TrainJob, version: int) -> tuple[str | None, Reason] | None:
        """The erasure (request id, reason) made since `job` was that took examples `version`
        was trained on, or None."""
        trained = set(self.store.manifest(job.persona_id, version).get("examples", {}).get("train", []))
        for entry in reversed(self.ledger.entries(job.persona_id)):
            if datetime.fromisoformat(str(entry.get("at"))) < job.created_at:
                continue
            if trained.intersection(entry.get("erased_ids", [])):
                return entry.get("request_id"), "retention" if entry.get("reason") == "retention" else "erasure"
        return None

    def _announce_again(self, job: TrainJob, version: int) -> Outcome:
        """The store already holds this job's version: announce that one again."""
        metrics.TRAINING_RUNS.labels(outcome="duplicate").inc()
        logs.event("train_job_duplicate", persona_id=job.persona_id, job_id=job.job_id, version=version)
        manifest = self.store.manifest(job.persona_id, version)
        return self._announce(job, version, AdapterMetrics.model_validate(manifest["metrics"]))

    def _announce(self, job: TrainJob, version: int, run: AdapterMetrics) -> Outcome:
        path = self.store.version_path(job.persona_id, version)
        manifest = self.store.manifest(job.persona_id, version)
        prompt = manifest["training"].get("prompt") or {"format": "plain"}
        ready = AdapterReady(
            persona_id=job.persona_id,
            version=version,
            adapter_path=str(path),
            adapter_uri=path.as_uri(),
            base_model=job.base_model,
            # As trained (lowered to the model's context, dropout off for expert weights).
            lora=LoraSpec.model_validate({k: v for k, v in manifest["training"].items() if k in LoraSpec.model_fields}),
            metrics=run,
            trigger=job.trigger,
            job_id=job.job_id,
            checksums=manifest["files"],
            prompt_format=prompt["format"],
            chat_template_sha256=prompt.get("chat_template_sha256"),
            created_at=utcnow(),
        )

        async def mark_trained() -> None:
            # Informational: the batcher already stopped counting these when the job was made.
            if job.examples.collection == "memory":
                ids = list(job.examples.ids)
                memory = memory_of(job.persona_id)
                stored = await self.collections.existing_ids(memory, ids)
                await self.collections.update_metadata(
                    memory, [i for i in ids if i in stored], {"trained_version": version}
                )

        return Outcome(
            publish=[
                Publish(self.topics.adapter_ready, job.persona_id, ready),
                self.status(
                    job,
                    "succeeded",
                    version=version,
                    loss=run.train_loss_last,
                    gate=run.gate,
                    **figures_of(run).fields(),
                    objective=run.objective,
                    preference_accuracy=run.preference_accuracy,
                ),
            ],
            then=[mark_trained],
        )


def figures_of(run: AdapterMetrics) -> GateFigures:
    """The quality gate's figures as a finished run's metrics hold them."""
    return GateFigures(**{name: getattr(run, name) for name in GateFigures.__dataclass_fields__})


def _count_gate(decision: GateDecision, figures: GateFigures) -> None:
    """A finished run's gate decision and figures on /metrics (`ings_quality_gate_total`,
    `ings_training_last_eval_loss`, `ings_training_last_fit_loss`, `ings_training_last_learned`,
    `ings_training_last_retention_kl`)."""
    metrics.QUALITY_GATE.labels(decision=decision).inc()
    f = figures
    for gauge, model, value in (
        (metrics.EVAL_LOSS, "adapter", f.eval_loss),
        (metrics.EVAL_LOSS, "base", f.base_eval_loss),
        (metrics.EVAL_LOSS, "previous", f.previous_eval_loss),
        (metrics.FIT_LOSS, "adapter", f.fit_loss),
        (metrics.FIT_LOSS, "base", f.base_fit_loss),
    ):
        if value is not None:
            gauge.labels(model=model).set(value)
    if f.learned is not None:
        metrics.LEARNED.set(f.learned)
    if f.retention_kl is not None:
        metrics.RETENTION_KL.set(f.retention_kl)
