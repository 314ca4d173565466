"""The trainer role: one train job at a time, from `ings.train-job` to `ings.adapter-ready`.

The run happens in the worker process; this side checks the job, reports status, moves
the finished adapter into the store, announces it, and marks the trained interactions.
The consumer commits the job's offset only after this handler returns, so a crash before
the announcement replays the job, and the store's job index makes the replay cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import logs, metrics
from ..bus import Producer
from ..config import Settings
from ..events import AdapterMetrics, AdapterReady, TrainJob, TuneState, TuneStatus, utcnow
from ..memory import Collections
from ..routing import Incoming
from .basemodels import BaseModelError, resolve_base_model
from .store import AdapterStore
from .worker import TrainingWorker, WorkRequest

PROGRESS_EVERY_S = 2.0


class Trainer:
    def __init__(self, settings: Settings, producer: Producer, collections: Collections) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer = producer
        self.collections = collections
        self.store = AdapterStore(settings.ings_adapter_dir.resolve())
        self.worker = TrainingWorker()
        self.running = 0

    async def close(self) -> None:
        await self.worker.close()

    async def handle(self, items: list[Incoming[TrainJob]]) -> None:
        for item in items:
            await self.run_job(item.event)

    async def run_job(self, job: TrainJob) -> None:
        if await self._announce_if_done(job):
            return  # a replayed job: announced again, nothing trained
        try:
            if job.base_model not in self.settings.allowed_base_models():
                raise BaseModelError(f"base model {job.base_model!r} is not allowed (INGS_ALLOWED_BASE_MODELS)")
            base_path = resolve_base_model(job.base_model, self.settings)
        except BaseModelError as exc:
            await self._status(job, "failed", reason=str(exc))
            metrics.TRAINING_RUNS.labels(outcome="rejected").inc()
            return
        await self._status(job, "started", total_steps=None)
        self.running = 1
        metrics.TRAINING_IN_PROGRESS.set(1)
        started = time.perf_counter()
        tmp_dir = self.store.new_tmp_dir(job.persona_id)
        previous = self.store.latest(job.persona_id)
        last_sent = 0.0

        async def on_progress(step: int, total: int, loss: float) -> None:
            nonlocal last_sent
            metrics.TRAINING_LAST_LOSS.set(loss)
            if time.monotonic() - last_sent >= PROGRESS_EVERY_S or step == total:
                last_sent = time.monotonic()
                await self._status(job, "progress", step=step, total_steps=total, loss=loss)

        try:
            outcome = await self.worker.run(
                WorkRequest(
                    job=job,
                    base_model_path=base_path,
                    tmp_dir=tmp_dir,
                    previous_adapter=self.store.version_path(job.persona_id, previous) if previous else None,
                    previous_version=previous,
                    quality_gate=self.settings.ings_quality_gate,
                    device=self.settings.ings_train_device,
                    gradient_checkpointing=self.settings.ings_gradient_checkpointing,
                ),
                on_progress,
            )
        finally:
            self.running = 0
            metrics.TRAINING_IN_PROGRESS.set(0)
            metrics.TRAINING_SECONDS.observe(time.perf_counter() - started)
        if outcome.error_type == "WorkerStopped":
            # Stopped by our own shutdown, not failed: leave the job uncommitted to replay.
            self.store.discard(tmp_dir)
            raise asyncio.CancelledError
        if not outcome.ok or outcome.metrics is None:
            self.store.discard(tmp_dir)
            metrics.TRAINING_RUNS.labels(outcome="failed").inc()
            await self._status(job, "failed", reason=outcome.reason, advice=outcome.advice)
            logs.event(
                "training_failed",
                logging.WARNING,
                persona_id=job.persona_id,
                job_id=job.job_id,
                reason=outcome.reason,
                error_type=outcome.error_type,
            )
            return
        if await self._announce_if_done(job):
            # Another trainer finished the same job meanwhile (after a rebalance): keep one.
            self.store.discard(tmp_dir)
            return
        version = self.store.publish(job.persona_id, tmp_dir)
        metrics.TRAINING_RUNS.labels(outcome="succeeded").inc()
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
        await self._announce(job, version, outcome.metrics)

    async def _announce_if_done(self, job: TrainJob) -> bool:
        """If the store already holds this job's version, announce that one again."""
        done = self.store.find_job(job.persona_id, job.job_id)
        if done is None:
            return False
        await self._announce(job, done, _manifest_metrics(self.store.manifest(job.persona_id, done)))
        metrics.TRAINING_RUNS.labels(outcome="duplicate").inc()
        logs.event("train_job_duplicate", persona_id=job.persona_id, job_id=job.job_id, version=done)
        return True

    async def _announce(self, job: TrainJob, version: int, run: AdapterMetrics) -> None:
        path = self.store.version_path(job.persona_id, version)
        ready = AdapterReady(
            persona_id=job.persona_id,
            version=version,
            adapter_path=str(path),
            adapter_uri=path.as_uri(),
            base_model=job.base_model,
            lora=job.lora,
            metrics=run,
            trigger=job.trigger,
            job_id=job.job_id,
            checksums=self.store.manifest(job.persona_id, version)["files"],
            created_at=utcnow(),
        )
        await self.producer.publish(self.topics.adapter_ready, job.persona_id, ready)
        await self._status(job, "succeeded", version=version, loss=run.train_loss_last)
        # Informational: the batcher already stopped counting these when the job was made.
        ids = [e.id for e in job.examples]
        stored = await self.collections.existing_ids("memory", ids)
        await self.collections.update_metadata("memory", [i for i in ids if i in stored], {"trained_version": version})

    async def _status(self, job: TrainJob, status: TuneState, **fields: Any) -> None:
        event = TuneStatus(
            persona_id=job.persona_id,
            status=status,
            job_id=job.job_id,
            request_id=None if job.trigger == "auto" else job.trigger,
            **fields,
        )
        await self.producer.publish(self.topics.tune_status, job.persona_id, event)


def _manifest_metrics(manifest: dict[str, Any]) -> AdapterMetrics:
    return AdapterMetrics.model_validate(manifest["metrics"])
