"""Tune requests: accept (store the examples, make the train job) or reject with a reason.

Every answer goes to `ings.tune-status`: `accepted` with the job id, or `rejected` with a
reason a person can act on. A request that does not even validate is dead-lettered by the
router and answered `rejected` here too, from whatever clean fields it has.
"""

from __future__ import annotations

import logging
from typing import Any

from ..basemodels import (
    BaseModelError,
    model_context_length,
    quantization_refusal,
    resolve_base_model,
    serving_refusal,
    within_context,
)
from ..config import Settings
from ..contract.events import TrainExample, TrainJob, TuneRequest, TuneState, TuneStatus
from ..contract.examples import Candidate, dedupe, example_set, example_text
from ..contract.ids import answer_ids, digest, utcnow
from ..runtime import logs, metrics
from ..runtime.deadletters import clean_text
from ..runtime.decode import Incoming, Invalid
from ..runtime.kafka import Publish, Record
from ..runtime.router import Outcome
from ..storage.chroma import Collections, memory_of
from ..storage.embedder import Embedder
from ..storage.examples import keep_examples
from . import privacy
from .batcher import memory_candidate
from .personas import Personas, training_refusal


class TuneRequests:
    def __init__(self, settings: Settings, collections: Collections, embedder: Embedder, personas: Personas) -> None:
        self.settings = settings
        self.collections = collections
        self.embedder = embedder
        self.personas = personas

    def status(self, persona_id: str | None, request_id: str | None, status: TuneState, **fields: Any) -> Publish:
        event = TuneStatus(persona_id=persona_id, request_id=request_id, status=status, **fields)
        return Publish(self.settings.topics.tune_status, persona_id, event)

    async def handle(self, items: list[Incoming[TuneRequest]]) -> Outcome:
        if self.settings.ings_redact_pii:
            items = await privacy.redacted(items, privacy.tune_request)
        outcome = Outcome()
        for item in items:
            req = item.event
            request_id = req.request_id or item.event_id
            try:
                job = await self._job(req, request_id)
            except Invalid as exc:
                outcome.publish.append(self.status(req.persona_id, request_id, "rejected", reason=str(exc)))
                logs.event("tune_rejected", logging.WARNING, persona_id=req.persona_id, reason=str(exc))
                continue
            outcome.publish += [
                Publish(self.settings.topics.train_job, req.persona_id, job),
                self.status(req.persona_id, request_id, "accepted", job_id=job.job_id),
            ]
            metrics.TRAIN_JOBS_PUBLISHED.labels(trigger="request").inc()
            logs.event("tune_accepted", persona_id=req.persona_id, job_id=job.job_id, examples=len(job.examples.ids))
        return outcome

    def on_invalid(self, record: Record, payload: dict[str, Any] | None, exc: Invalid) -> list[Publish]:
        """A tune request that failed validation is answered `rejected`, not only dead-lettered."""
        pid, request_id = answer_ids(payload)
        return [self.status(pid, request_id, "rejected", reason=clean_text(str(exc)))]

    async def _job(self, req: TuneRequest, request_id: str) -> TrainJob:
        settings = self.settings
        persona = await self.personas.get(req.persona_id)
        if persona is None:
            raise Invalid("unknown_persona", f"unknown persona {req.persona_id}: send its handshake first")
        refusal = training_refusal(persona, settings)
        if refusal:
            raise Invalid("online_persona", refusal)
        model = req.lora_config.model_name or settings.ings_base_model
        if not model:
            raise Invalid("no_base_model", "no base model: set lora_config.model_name or INGS_BASE_MODEL")
        try:
            window = model_context_length(resolve_base_model(model, settings))
        except BaseModelError as exc:
            raise Invalid("base_model", str(exc)) from None
        asked = req.lora_config.max_seq_len
        if window is not None and asked > window and "max_seq_len" in req.lora_config.model_fields_set:
            raise Invalid(
                "max_seq_len",
                f"lora_config.max_seq_len {asked} is longer than the {window}-token context of base model"
                f" {model}: send a max_seq_len of at most {window}",
            )
        refusal = quantization_refusal(req.lora_config.quantization, settings)
        if refusal:
            raise Invalid("quantization", refusal)
        if refusal := serving_refusal(req.lora_config, settings):
            raise Invalid("not_servable", refusal)
        if len(req.training_data) > settings.ings_max_job_examples:
            raise Invalid(
                "too_many_examples",
                f"{len(req.training_data)} examples; the limit is {settings.ings_max_job_examples}"
                " per request (INGS_MAX_JOB_EXAMPLES)",
            )
        # Ids from the persona and the content: the same example sent again (a replayed
        # request) is the same example, so the quality gate never holds out what an earlier
        # version already learned. Exact repeats within a request collapse to one.
        unique: dict[str, TrainExample] = {}
        for x in req.training_data:
            example_id = "ex-" + digest("tune", req.persona_id, x.input, x.output)
            unique.setdefault(example_id, TrainExample(id=example_id, input=x.input, output=x.output))
        given = list(unique.values())
        vectors = await self.embedder.embed([example_text(e.input, e.output) for e in given])
        candidates = [Candidate(e, v) for e, v in zip(given, vectors, strict=True)]
        if req.include_memory:
            newest = 2 * settings.ings_max_job_examples
            stored = await self.collections.newest(memory_of(req.persona_id), newest, embeddings=True)
            candidates += [memory_candidate(r) for r in stored]
        examples = dedupe(candidates)[: settings.ings_max_job_examples]
        if len(examples) < settings.ings_min_examples:
            raise Invalid(
                "too_few_examples",
                f"{len(examples)} examples after de-duplication; at least {settings.ings_min_examples} "
                "are needed (INGS_MIN_EXAMPLES)",
            )
        # Memory examples are copied too, so the job's examples live in one collection.
        kept = {e.id for e in examples}
        chosen = [c for c in candidates if c.example.id in kept]
        await keep_examples(
            self.collections, req.persona_id, [c.example for c in chosen], [c.vector or [] for c in chosen]
        )
        by_id = {c.example.id: c.example for c in chosen}
        lora = within_context(req.lora_config.model_copy(update={"model_name": model}), window)
        claim = example_set("examples", [by_id[e.id] for e in examples])
        return TrainJob(
            # The same request replayed is the same job (trained once); the same request id
            # with other examples or settings is another job, not the old one announced again.
            job_id="req-"
            + digest("request", req.persona_id, request_id, claim.sha256, lora.model_dump_json(), length=24),
            persona_id=req.persona_id,
            trigger=request_id,
            base_model=model,
            lora=lora,
            examples=claim,
            created_at=utcnow(),
        )
