"""One LoRA run on an already loaded base model: train, evaluate, gate, save, clean up.

Runs synchronously inside the worker process. The base model is modified in place by peft
while the run lasts and is handed back with every LoRA layer removed, so the next job on
the same base starts from untouched weights.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..basemodels import context_length, within_context
from ..contract.events import AdapterMetrics, LoraSpec, TrainExample, TrainJob
from ..contract.examples import Candidate, dedupe
from ..contract.ids import digest
from ..runtime import heap
from ..storage.adapters import write_manifest
from .data import (
    GATE_MIN_EXAMPLES,
    Encoded,
    PromptFormat,
    chunks,
    collate,
    encode,
    end_of_turn_ids,
    length_grouped,
    split_examples,
    supervised,
    weighted,
)
from .gate import GateFigures, GateLimits, QualityGateFailed, verdict
from .loss import ADAPTER, evaluate, held_out_losses, loss_sum
from .preference import Labelled, PreferenceReport, labelled, split_labels, train_preferences
from .retention import reference_answers, replay_examples, retention_kl
from .targets import autocast_dtype, has_conv1d, resolve_device, target_modules_for, target_parameters_for

log = logging.getLogger(__name__)

BATCH_SIZE = 4
# The default plan of a job that names neither epochs nor max_steps (planned_steps).
DEFAULT_MIN_STEPS = 60
DEFAULT_PASSES = 6
DEFAULT_MAX_STEPS = 200
DEFAULT_MIN_PASSES = 2
MAX_GRAD_NORM = 1.0
# A loss this many times the first one (and this many nats above it, so that a base that
# already fits the data does not trip on noise, and above a uniform guess) means the run
# has left its basin.
DIVERGENCE_FACTOR = 4.0
DIVERGENCE_MARGIN = 2.0
# Training examples the gate's `learned` check measures (the shortest, so it stays cheap).
FIT_SAMPLE = 32


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training diverged at step {step}: loss {loss:.4g}")
        self.step = step
        self.loss = loss


def planned_steps(n_train: int, batch_size: int, spec: LoraSpec) -> int:
    """Optimizer steps of a run on `n_train` examples (replay included): `spec.max_steps`,
    else `spec.epochs` full passes, else the default plan: DEFAULT_PASSES passes, at least
    DEFAULT_MIN_STEPS steps, and past DEFAULT_MAX_STEPS only DEFAULT_MIN_PASSES passes.

    A few dozen examples make too few steps per pass to learn anything (18 steps: 0 of 12
    facts; 60: 11 of 12); a persona with more varied examples needs passes, not a fixed
    count (60 steps over 29 mixed examples: 4 of 8 facts); hundreds of examples repeat
    what matters, and a CPU cannot afford six passes over them. bench/RESULTS.md, "Default
    plan"."""
    per_epoch = math.ceil(n_train / batch_size)
    if spec.max_steps is not None:
        return spec.max_steps
    if spec.epochs is not None:
        return per_epoch * spec.epochs
    capped = min(DEFAULT_PASSES * per_epoch, max(DEFAULT_MIN_PASSES * per_epoch, DEFAULT_MAX_STEPS))
    return max(DEFAULT_MIN_STEPS, capped)


@dataclass
class RunResult:
    metrics: AdapterMetrics
    # sha256 per file of the adapter folder, manifest.json included.
    checksums: dict[str, str]


# --- the run -------------------------------------------------------------------------------


def train_adapter(
    model: Any,
    tokenizer: Any,
    job: TrainJob,
    job_examples: Sequence[TrainExample],
    out_dir: Path,
    *,
    previous_adapter: Path | None,
    gate: GateLimits,
    on_progress: Callable[[int, int, float], None],
    gradient_checkpointing: bool = False,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
    parent_version: int | None = None,
    base_revision: str | None = None,
    system: str | None = None,
    previous_trained: frozenset[str] = frozenset(),
    gate_min_examples: int = GATE_MIN_EXAMPLES,
    preference: Sequence[TrainExample] = (),
) -> RunResult:
    """Train a LoRA adapter for `job` on `job_examples` (the examples its claim check names)
    with `model`, save it with its manifest in `out_dir`. Examples are rendered in the
    model's own prompt format (`data.PromptFormat`), `system` (the persona's description)
    as the system turn of chat templates.

    From `gate_min_examples` examples up some are held out, never ones in
    `previous_trained` (the training ids of `previous_adapter`, from its manifest); the run
    is kept only if it passes the quality gate (`gate.verdict`): its held-out loss beats the
    base model's and, when the split avoided its training examples, the previous adapter's;
    it learned its training examples; its general answers stay close to the base's.

    Feedback shapes the supervised set (`data.supervised`, `data.weighted`). With
    `preference` (the persona's labelled examples), a preference phase follows on the
    supervised adapter (`preference.train_preferences`); its gate refusing it keeps the
    supervised adapter.

    Raises TrainingDiverged, QualityGateFailed, torch.OutOfMemoryError or ValueError (no
    usable examples); the base model is returned clean in every case.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    started = time.monotonic()
    # A job from elsewhere may ask for more than the model can attend over: examples are cut
    # to the model's window (see `encode`), never indexed past it.
    spec = within_context(job.lora, context_length(model.config.to_dict()))
    # The ingest side already de-duplicated with embeddings; a hand-written job may not have.
    fmt = PromptFormat.of(tokenizer, system)
    stops = end_of_turn_ids(tokenizer, model)
    labels, held_labels = split_labels(
        labelled(
            preference,
            lambda i, o: encode(tokenizer, TrainExample(id="", input=i, output=o), spec.max_seq_len, fmt, stops),
        )
    )
    # Held-out labels are held out of the whole run, so the preference check is fair.
    held_ids = {h.id for h in held_labels}
    examples = dedupe([Candidate(e, None) for e in supervised(job_examples) if e.id not in held_ids])
    train_set, eval_set, clean = split_examples(examples, gate_min_examples, previous_trained)
    compare = previous_adapter if clean else None  # held-out examples it learned: no fair test
    if not train_set:
        raise ValueError("the job has no training examples")
    dev = resolve_device(device)
    amp = autocast_dtype(dev)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_enc = [encode(tokenizer, e, spec.max_seq_len, fmt, stops) for e in weighted(train_set)]
    eval_batches = [
        collate(chunk, pad_id, dev)
        for chunk in chunks([encode(tokenizer, e, spec.max_seq_len, fmt, stops) for e in eval_set], batch_size)
    ]
    fit_batches = [
        collate(chunk, pad_id, dev)
        for chunk in chunks(sorted(train_enc, key=lambda e: len(e.ids))[:FIT_SAMPLE], batch_size)
    ]
    seed = int(digest("seed", job.job_id, length=8), 16)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)

    use_cache = getattr(model.config, "use_cache", None)
    if getattr(model, "hf_quantizer", None) is None:  # bitsandbytes places its own weights
        model.to(dev)
    # The base's own answers, before any adapter is attached: what retention is scored on,
    # and the replay mixed into training.
    references = reference_answers(model, tokenizer, fmt) if gate.enabled else []
    replay = replay_examples(model, tokenizer, fmt, round(spec.replay_ratio * len(train_enc)))
    prepared = time.monotonic()
    targets = spec.target_modules or target_modules_for(model)
    parameters = [] if spec.target_modules else target_parameters_for(model)
    if parameters and spec.dropout:
        # peft's parameter targeting (ParamWrapper) has no dropout; the manifest and the
        # announcement say 0.0, what was trained.
        spec = spec.model_copy(update={"dropout": 0.0})
    lora_config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        fan_in_fan_out=has_conv1d(model),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 probes a transformers attribute that transformers 5 deprecated; the
        # warning is about peft's code, not ours, and would repeat on every run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model: Any = get_peft_model(model, lora_config, adapter_name=ADAPTER)
    try:
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, which frozen embeddings lack.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        fit = _fit(peft_model, [*train_enc, *replay], spec, batch_size, pad_id, dev, amp, order, on_progress)
        trained = time.monotonic()

        eval_loss = base_loss = previous_loss = None
        if eval_batches:
            eval_loss, base_loss, previous_loss = held_out_losses(peft_model, eval_batches, compare, amp, dev)
        figures = GateFigures(eval_loss=eval_loss, base_eval_loss=base_loss, previous_eval_loss=previous_loss)
        if gate.enabled:  # the learned and retention checks cost about 10 s on SmolLM2-135M
            fit_loss = evaluate(peft_model, fit_batches, amp)
            with peft_model.disable_adapter():
                base_fit_loss = evaluate(peft_model, fit_batches, amp)
            figures = replace(figures, fit_loss=fit_loss, base_fit_loss=base_fit_loss)
        retention = partial(retention_kl, peft_model, references, pad_id, amp) if references else None
        preferred: PreferenceReport | None = None
        if labels:
            preferred, kl = train_preferences(
                peft_model, labels, held_labels, gate, retention, pad_id, amp, order, on_progress, replay
            )
        else:
            kl = retention() if retention else None
        figures = replace(figures, retention_kl=kl)
        decision, reasons = verdict(gate, figures)
        gated = time.monotonic()
        if decision == "failed":
            raise QualityGateFailed(figures, reasons)

        adapter_config = peft_model.peft_config[ADAPTER]
        # The requested id, not the local folder it was resolved to: the folder is a detail
        # of this machine, the id is what a consumer loads. peft's model card reads the name
        # from the base model and its config, so those say the id too while saving.
        adapter_config.base_model_name_or_path = job.base_model
        adapter_config.revision = base_revision
        local_names = (model.name_or_path, model.config.name_or_path)
        model.name_or_path = model.config.name_or_path = job.base_model
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
        finally:
            model.name_or_path, model.config.name_or_path = local_names

        metrics = AdapterMetrics(
            train_loss_first=fit.first_loss,
            train_loss_last=fit.last_loss,
            **figures.fields(),
            examples=len(examples),
            eval_examples=len(eval_set),
            tokens=fit.tokens,
            steps=fit.steps,
            duration_s=round(time.monotonic() - started, 3),
            gate=decision,
            compared_version=parent_version if previous_loss is not None else None,
            **_preference_fields(preferred),
        )
        param_dtype = next(model.parameters()).dtype
        checksums = write_manifest(
            out_dir,
            job=job,
            metrics=metrics,
            training={
                **spec.model_dump(mode="json"),
                "target_modules": list(targets),
                "target_parameters": parameters,
                "batch_size": batch_size,
                "steps": fit.steps,
                "warmup_steps": fit.warmup,
                "max_grad_norm": MAX_GRAD_NORM,
                "replay_examples": len(replay),
                # Where the run's time went: rendering and the base's reference and replay
                # answers, the optimizer steps, the gate's evaluations, saving.
                "timings_s": {
                    "prepare": round(prepared - started, 2),
                    "train": round(trained - prepared, 2),
                    "gate": round(gated - trained, 2),
                    "save": round(time.monotonic() - gated, 2),
                },
                "seed": seed,
                "device": str(dev),
                "dtype": str(param_dtype).removeprefix("torch."),
                "autocast_dtype": str(amp).removeprefix("torch.") if amp else None,
                "gradient_checkpointing": gradient_checkpointing,
                "prompt": fmt.describe(),
                "preference": None if preferred is None else asdict(preferred),
            },
            example_ids=_example_ids(train_set, eval_set, labels, held_labels, preferred),
            parent_version=parent_version,
            base_revision=base_revision,
            tokenizer_sha256=_tokenizer_sha256(tokenizer),
        )
        return RunResult(metrics=metrics, checksums=checksums)
    finally:
        _restore_base(model, peft_model, gradient_checkpointing, use_cache)
        del peft_model
        release_memory()


@dataclass
class _FitStats:
    first_loss: float
    last_loss: float
    tokens: int
    steps: int
    warmup: int


def _fit(
    peft_model: Any,
    train_enc: Sequence[Encoded],
    spec: LoraSpec,
    batch_size: int,
    pad_id: int,
    dev: torch.device,
    amp: torch.dtype | None,
    order: torch.Generator,
    on_progress: Callable[[int, int, float], None],
) -> _FitStats:
    """The training loop. The optimizer state lives in this frame only, so it is freed as
    soon as the loop returns instead of lingering until the caller's cleanup."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    total = planned_steps(len(train_enc), batch_size, spec)
    warmup = min(10, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)),
    )
    first_loss = last_loss = limit = math.nan
    head = peft_model.get_output_embeddings()
    uniform = math.log(head.weight.shape[0]) if head is not None else 0.0  # ln(vocabulary), nats
    tokens = step = 0
    lengths = [len(e.ids) for e in train_enc]
    peft_model.train()
    while step < total:
        for indices in length_grouped(lengths, batch_size, order)[: total - step]:
            step += 1
            batch = collate([train_enc[i] for i in indices], pad_id, dev)
            summed, n = loss_sum(peft_model, batch, amp)
            loss = summed / max(n, 1)
            value = float(loss.item())
            if step == 1:
                first_loss = value
                # Never below a uniform guess over the vocabulary: a first batch of replay (the
                # base's own answers, ~0.8 nats) must not make a persona batch (~3.4) "diverged".
                limit = max(DIVERGENCE_FACTOR * value, value + DIVERGENCE_MARGIN, uniform + DIVERGENCE_MARGIN)
            if not math.isfinite(value) or value > limit:
                raise TrainingDiverged(step, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            if not math.isfinite(float(grad_norm)):
                raise TrainingDiverged(step, value)
            optimizer.step()
            scheduler.step()
            last_loss = value
            tokens += int(batch["attention_mask"].sum().item())
            on_progress(step, total, value)
    return _FitStats(first_loss, last_loss, tokens, step, warmup)


def _example_ids(
    train_set: Sequence[TrainExample],
    eval_set: Sequence[TrainExample],
    labels: Sequence[Labelled],
    held_labels: Sequence[Labelled],
    preferred: PreferenceReport | None,
) -> dict[str, list[str]]:
    """The manifest's example ids. `train` is everything the weights kept learned from, the
    preference phase's labels included when it was kept: erasure retires a version by it,
    and the next run's held-out split avoids it. `supervised`, `preference` and
    `preference_eval` say which phase used which."""
    supervised_ids = list(dict.fromkeys(e.id for e in train_set))
    kept = preferred is not None and preferred.objective != "sft"
    preference_ids = [i.id for i in labels] if kept else []
    return {
        "train": list(dict.fromkeys([*supervised_ids, *preference_ids])),
        "eval": [e.id for e in eval_set],
        "supervised": supervised_ids,
        "preference": preference_ids,
        "preference_eval": [i.id for i in held_labels] if kept else [],
    }


def _preference_fields(report: PreferenceReport | None) -> dict[str, Any]:
    """AdapterMetrics fields of a run's preference phase (none: the defaults)."""
    if report is None:
        return {}
    return {
        "objective": report.objective,
        "preference_labels": report.labels,
        "preference_eval_labels": report.eval_labels,
        "preference_accuracy": None if report.accuracy is None else round(report.accuracy, 6),
        "preference_gate": report.gate,
        "preference_refused": report.refused,
    }


def _restore_base(model: Any, peft_model: Any, gradient_checkpointing: bool, use_cache: Any) -> None:
    peft_model.unload()  # replaces every LoRA layer with the original module, in place
    if gradient_checkpointing:
        model.activation_checkpointing_disable()
    if use_cache is not None:
        model.config.use_cache = use_cache
    model.eval()


def release_memory() -> None:
    gc.collect()
    heap.trim()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenizer_sha256(tokenizer: Any) -> str | None:
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    if source.is_file():
        return hashlib.sha256(source.read_bytes()).hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    return None
