"""The preference phase of a run: KTO on unpaired up/down labels, DPO on pairs from
corrections, trained on top of the run's supervised adapter, and the held-out check that
the gate reads.

Sources: DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", eq. 7. KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as
Prospect Theoretic Optimization", eq. 8 and section 4.2 (the reference point z0, estimated
on mismatched pairs and not back-propagated; lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]).
Log-probabilities are summed over the answer tokens, as in both papers; the reference
policy is the supervised adapter this run trained just before (the "SFT model" of both).

Written here rather than taken from TRL (1.16): its DPOTrainer and KTOTrainer are
transformers Trainers that tokenise their own datasets, load and own the model and the
loop, and keep the losses as trainer methods. The worker keeps one base loaded between
jobs, renders examples with `data.encode` (chat template, special tokens in content read
as text), reads a job's data by claim check and gates the result; the losses are a few
lines each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..contract.events import GateDecision, TrainExample
from ..contract.ids import digest
from .data import IGNORE_INDEX, Encoded, collate
from .gate import GateLimits, preference_verdict
from .loss import answer_logits, loss_sum

# The strength of the pull towards the reference policy. Both papers default to 0.1; on
# SmolLM2-135M 0.1 moved general answers too far (retention KL 1.61, garbled words) where
# 0.5 kept them (1.35) and reached 80% held-out accuracy against 60% (bench/RESULTS.md,
# "Preference runs").
BETA = 0.5
# The phase's plan, measured on SmolLM2-135M-Instruct (bench/RESULTS.md, "Preference runs").
LEARNING_RATE = 5e-4
PASSES = 4
MIN_STEPS = 24
BATCH_SIZE = 4
MAX_GRAD_NORM = 1.0
# Each step also takes the supervised loss on this many replay examples (the base's own
# answers to general prompts, `retention.replay_examples`) at this weight: an anchor that
# keeps the phase from drifting on everything else.
ANCHOR_BATCH = 2
ANCHOR_WEIGHT = 1.0
# Labelled examples held out for the gate's preference check: this share, at least
# MIN_HELD_OUT, once a job has PREFERENCE_GATE_MIN of them (fewer: not gated).
HELD_OUT_SHARE = 0.2
MIN_HELD_OUT = 2
PREFERENCE_GATE_MIN = 8

Kind = Literal["pair", "desirable", "undesirable"]


@dataclass(frozen=True)
class Labelled:
    """One labelled example, encoded: a pair from a correction (chosen and rejected), an
    up-voted answer (chosen only) or a down-voted one (rejected only)."""

    id: str
    chosen: Encoded | None
    rejected: Encoded | None

    @property
    def kind(self) -> Kind:
        if self.chosen is not None and self.rejected is not None:
            return "pair"
        return "desirable" if self.chosen is not None else "undesirable"


def labelled(examples: Sequence[TrainExample], encode: Callable[[str, str], Encoded]) -> list[Labelled]:
    """The examples that carry a label, encoded by `encode(input, output)`: a correction
    makes a pair (the correction chosen, the original answer rejected) whatever the rating;
    otherwise up is desirable and down undesirable. Unlabelled examples are left out."""
    out: list[Labelled] = []
    for e in examples:
        if e.correction:
            out.append(Labelled(e.id, encode(e.input, e.correction), encode(e.input, e.output)))
        elif e.feedback == "up":
            out.append(Labelled(e.id, encode(e.input, e.output), None))
        elif e.feedback == "down":
            out.append(Labelled(e.id, None, encode(e.input, e.output)))
    return out


def objective_of(items: Sequence[Labelled]) -> Literal["kto", "dpo"]:
    """DPO when every label is a pair (corrections only); KTO otherwise, which learns from
    unpaired labels and takes a pair as one desirable and one undesirable answer."""
    return "dpo" if items and all(i.kind == "pair" for i in items) else "kto"


def split_labels(items: Sequence[Labelled]) -> tuple[list[Labelled], list[Labelled]]:
    """(train, held-out): from PREFERENCE_GATE_MIN labels up, HELD_OUT_SHARE of them (at
    least MIN_HELD_OUT) held out, chosen by id hash so the same labels always land on the
    same side; fewer labels all train and the phase is not gated."""
    if len(items) < PREFERENCE_GATE_MIN:
        return list(items), []
    n_held = max(MIN_HELD_OUT, round(len(items) * HELD_OUT_SHARE))
    ranked = sorted(items, key=lambda i: digest("preference-split", i.id))
    held = {id(i) for i in ranked[:n_held]}
    return [i for i in items if id(i) not in held], [i for i in items if id(i) in held]


# --- log-probabilities and losses ------------------------------------------------------------


def sequence_logps(model: Any, items: Sequence[Encoded], pad_id: int, amp: torch.dtype | None) -> torch.Tensor:
    """Summed log-probability of each item's answer tokens (those from `prompt_len` on)
    given its prompt, shape [len(items)], from `loss.answer_logits`."""
    logits, targets = answer_logits(model, collate(items, pad_id, next(model.parameters()).device), amp)
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """Mean DPO loss over a batch of pairs (Rafailov et al. 2023, eq. 7): -log sigmoid(BETA
    * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))). Inputs are
    summed answer log-probabilities, shape [batch]."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -nn.functional.logsigmoid(BETA * margin).mean()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    weight_desirable: float = 1.0,
    weight_undesirable: float = 1.0,
) -> torch.Tensor:
    """Mean KTO loss over a batch (Ethayarajh et al. 2024, eq. 8): with the implied reward
    r = log pi(y|x) - log ref(y|x) and the reference point z0 = `kl` (already clamped at 0
    and detached), a desirable answer costs lambda_D * (1 - sigmoid(BETA * (r - z0))), an
    undesirable one lambda_U * (1 - sigmoid(BETA * (z0 - r))). `desirable` is a bool
    tensor, the same shape as `logps`."""
    reward = logps - ref_logps
    good = weight_desirable * (1 - torch.sigmoid(BETA * (reward - kl)))
    bad = weight_undesirable * (1 - torch.sigmoid(BETA * (kl - reward)))
    return torch.where(desirable, good, bad).mean()


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) with lambda_D * n_D / (lambda_U * n_U) = 1, inside the range the
    KTO paper recommends (section 4.2) for imbalanced labels; (1, 1) when one side is empty."""
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    return n_undesirable / n_desirable, 1.0


# --- the phase -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """One answer a KTO step scores: the encoded example, whether it is desirable, and the
    mismatched example (this prompt, another example's answer) that estimates z0."""

    example: Encoded
    desirable: bool
    mismatched: Encoded


def _answers(items: Sequence[Labelled]) -> list[_Answer]:
    flat = [(e, True) for i in items if (e := i.chosen) is not None]
    flat += [(e, False) for i in items if (e := i.rejected) is not None]
    out = []
    for n, (example, good) in enumerate(flat):
        prompt = example.ids[: example.prompt_len]
        # The next answer (cyclically) to another prompt; a lone prompt is its own mismatch.
        other = next(
            (
                flat[(n + k) % len(flat)][0]
                for k in range(1, len(flat))
                if _prompt(flat[(n + k) % len(flat)][0]) != prompt
            ),
            example,
        )
        out.append(_Answer(example, good, Encoded(prompt + other.ids[other.prompt_len :], len(prompt))))
    return out


def _prompt(e: Encoded) -> list[int]:
    return e.ids[: e.prompt_len]


@dataclass
class PhaseResult:
    objective: Literal["kto", "dpo"]
    steps: int
    first_loss: float
    last_loss: float
    # Share of held-out comparisons right against the supervised parent (None: none held out).
    accuracy: float | None


@torch.no_grad()
def _reference(model: Any, items: Sequence[Encoded], pad_id: int, amp: torch.dtype | None) -> torch.Tensor:
    model.eval()
    out = [sequence_logps(model, items[s : s + BATCH_SIZE], pad_id, amp) for s in range(0, len(items), BATCH_SIZE)]
    return torch.cat(out) if out else torch.zeros(0)


def held_out_accuracy(
    model: Any, held: Sequence[Labelled], reference: torch.Tensor, pad_id: int, amp: torch.dtype | None
) -> float:
    """The share of held-out (chosen, rejected) comparisons the adapter of `model` gets
    right against the reference log-probabilities `reference` (of `_flat(held)`, in order),
    by the implied reward r = log p_new(y|x) - log p_ref(y|x) of both papers: r(chosen) >
    r(rejected). Chosen answers are corrections and up-voted answers, rejected ones the
    corrected originals and down-voted answers; every chosen is compared with every rejected
    (for a pair, that includes its own comparison: its margin log p(chosen) - log
    p(rejected) grew). With one side only, the share of answers moved the right way."""
    reward = _reference(model, _flat(held), pad_id, amp) - reference
    good: list[float] = []
    bad: list[float] = []
    at = 0
    for item in held:
        for answer, side in ((item.chosen, good), (item.rejected, bad)):
            if answer is not None:
                side.append(float(reward[at]))
                at += 1
    if good and bad:
        return sum(g > b for g in good for b in bad) / (len(good) * len(bad))
    return (sum(g > 0 for g in good) + sum(b < 0 for b in bad)) / max(len(good) + len(bad), 1)


def _flat(items: Sequence[Labelled]) -> list[Encoded]:
    return [e for i in items for e in (i.chosen, i.rejected) if e is not None]


def preference_phase(
    peft_model: Any,
    train: Sequence[Labelled],
    held: Sequence[Labelled],
    pad_id: int,
    amp: torch.dtype | None,
    order: torch.Generator,
    on_progress: Callable[[int, int, float], None],
    anchors: Sequence[Encoded] = (),
) -> PhaseResult:
    """Train the active adapter of `peft_model` with the preference objective of `train`
    (`objective_of`), its current weights as the reference policy; then the held-out
    accuracy (`held_out_accuracy`) on `held`. PASSES passes over the labels, at least
    MIN_STEPS steps of BATCH_SIZE, AdamW at LEARNING_RATE with linear warmup and decay;
    with `anchors` (replay examples) each step adds their supervised loss (ANCHOR_BATCH,
    ANCHOR_WEIGHT).
    Raises ValueError when `train` is empty; the caller restores the weights when the result
    is refused."""
    if not train:
        raise ValueError("no labelled examples to train on")
    objective = objective_of(train)
    held_reference = _reference(peft_model, _flat(held), pad_id, amp)
    if objective == "dpo":
        units: list[Any] = list(train)
        chosen = _reference(peft_model, [i.chosen for i in train if i.chosen], pad_id, amp)
        rejected = _reference(peft_model, [i.rejected for i in train if i.rejected], pad_id, amp)
        references = [torch.stack([c, r]) for c, r in zip(chosen, rejected, strict=True)]
        weights = (1.0, 1.0)
    else:
        units = _answers(train)
        own = _reference(peft_model, [a.example for a in units], pad_id, amp)
        mismatched = _reference(peft_model, [a.mismatched for a in units], pad_id, amp)
        references = [torch.stack([o, m]) for o, m in zip(own, mismatched, strict=True)]
        weights = kto_weights(sum(a.desirable for a in units), sum(not a.desirable for a in units))

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    total = max(MIN_STEPS, PASSES * math.ceil(len(units) / BATCH_SIZE))
    warmup = min(5, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    first = last = math.nan
    step = 0
    # Dropout off (eval mode), as TRL's `disable_dropout`: the policy and its reference must
    # differ by what training changed, not by noise.
    peft_model.eval()
    while step < total:
        perm = torch.randperm(len(units), generator=order).tolist()
        for start in range(0, len(perm), BATCH_SIZE):
            if step >= total:
                break
            picked = perm[start : start + BATCH_SIZE]
            ref = torch.stack([references[i] for i in picked])
            if objective == "dpo":
                logps = sequence_logps(
                    peft_model, [e for i in picked for e in (units[i].chosen, units[i].rejected)], pad_id, amp
                )
                loss = dpo_loss(logps[0::2], logps[1::2], ref[:, 0], ref[:, 1])
            else:
                answers = [units[i] for i in picked]
                logps = sequence_logps(peft_model, [a.example for a in answers], pad_id, amp)
                with torch.no_grad():
                    policy_kl = sequence_logps(peft_model, [a.mismatched for a in answers], pad_id, amp)
                kl = (policy_kl - ref[:, 1]).mean().clamp(min=0).detach()
                desirable = torch.tensor([a.desirable for a in answers], device=logps.device)
                loss = kto_loss(logps, ref[:, 0].to(logps.device), desirable, kl, *weights)
            if anchors and ANCHOR_WEIGHT:
                chosen_anchors = [anchors[(step * ANCHOR_BATCH + j) % len(anchors)] for j in range(ANCHOR_BATCH)]
                device = next(peft_model.parameters()).device
                summed, n = loss_sum(peft_model, collate(chosen_anchors, pad_id, device), amp)
                loss = loss + ANCHOR_WEIGHT * summed / max(n, 1)
            value = float(loss.item())
            if not math.isfinite(value):
                raise FloatingPointError(f"preference loss is {value} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            step += 1
            first = value if step == 1 else first
            last = value
            on_progress(step, total, value)
    accuracy = held_out_accuracy(peft_model, held, held_reference, pad_id, amp) if held else None
    return PhaseResult(objective, step, first, last, accuracy)


@dataclass
class PreferenceReport:
    """What the phase did, for the manifest and the events: the objective of the weights
    kept ("sft" when the gate refused the phase and the supervised weights were restored)."""

    objective: Literal["sft", "kto", "dpo"]
    labels: int
    eval_labels: int
    accuracy: float | None
    gate: GateDecision
    refused: str | None
    steps: int
    first_loss: float
    last_loss: float


def train_preferences(
    peft_model: Any,
    train: Sequence[Labelled],
    held: Sequence[Labelled],
    limits: GateLimits,
    retention: Callable[[], float] | None,
    pad_id: int,
    amp: torch.dtype | None,
    order: torch.Generator,
    on_progress: Callable[[int, int, float], None],
    anchors: Sequence[Encoded] = (),
) -> tuple[PreferenceReport, float | None]:
    """The preference phase on `train`, checked on `held` (`split_labels`; the caller keeps
    `held` out of the supervised phase too), judged by `gate.preference_verdict` with
    `retention()` (the retention KL of the current weights); refused, the supervised weights
    are put back and the run goes on without it. Returns the report and the retention KL of
    the weights kept (None without `retention`)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    supervised = [p.detach().clone() for p in params]
    phase = preference_phase(peft_model, train, held, pad_id, amp, order, on_progress, anchors)
    kl = retention() if retention else None
    decision, reasons = preference_verdict(limits, phase.accuracy, kl)
    objective: Literal["sft", "kto", "dpo"] = phase.objective
    if decision == "failed":
        with torch.no_grad():
            for p, saved in zip(params, supervised, strict=True):
                p.copy_(saved)
        objective = "sft"
        kl = retention() if retention else None
    report = PreferenceReport(
        objective=objective,
        labels=len(train),
        eval_labels=len(held),
        accuracy=phase.accuracy,
        gate=decision,
        refused="; ".join(reasons) or None,
        steps=phase.steps,
        first_loss=phase.first_loss,
        last_loss=phase.last_loss,
    )
    return report, kl
