"""Losses of a model on encoded batches: the training loss over answer tokens, held-out
evaluation, and the held-out comparison of a new adapter with the base and the previous
version (loaded beside it on the same base for the comparison)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX

log = logging.getLogger(__name__)
ADAPTER = "default"
PREVIOUS = "previous"


def answer_logits(
    model: Any, batch: dict[str, torch.Tensor], amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits in float32, shape [batch, span, vocabulary]; the labels they predict, shape
    [batch, span], IGNORE_INDEX outside answers) over the span of positions that predict a
    label (the answers).

    Logits are computed only over that span, through the model's own `logits_to_keep`: the
    output head of a 50k-token vocabulary is the largest matrix of a small model, and
    prompts are most of each sequence. Same loss, 15% less time per step on SmolLM2-135M
    (bench/RESULTS.md).
    """
    device_type = batch["input_ids"].device.type
    autocast = torch.autocast(device_type, dtype=amp) if amp else contextlib.nullcontext()
    labels = batch["labels"]
    # Position t predicts token t+1: the kept span runs from the first label's predecessor.
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first, last = (int(labelled[0]), int(labelled[-1]) + 1) if len(labelled) else (0, 1)
    with autocast:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=torch.arange(first, last, device=labels.device),
        ).logits
    return logits.float(), labels[:, first + 1 : last + 1]


def loss_sum(model: Any, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over label tokens, and how many there were (`answer_logits`)."""
    shift_logits, shift_labels = answer_logits(model, batch, amp)
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum().item())


@torch.no_grad()
def evaluate(model: Any, batches: Sequence[dict[str, torch.Tensor]], amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = loss_sum(model, batch, amp)
        total += float(loss.item())
        count += n
    return total / max(count, 1)


def held_out_losses(
    peft_model: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    previous: Path | None,
    amp: torch.dtype | None,
    dev: torch.device,
) -> tuple[float, float, float | None]:
    """Held-out loss of the new adapter, of the bare base, and of the previous version,
    which is loaded beside the new adapter on the same base and deleted afterwards."""
    adapter = evaluate(peft_model, batches, amp)
    with peft_model.disable_adapter():
        base = evaluate(peft_model, batches, amp)
    if previous is None:
        return adapter, base, None
    try:
        peft_model.load_adapter(str(previous), adapter_name=PREVIOUS, torch_device=str(dev))
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        # A previous version that cannot be loaded must not block every future run.
        log.warning("previous adapter %s could not be loaded, not comparing with it: %s", previous, exc)
        return adapter, base, None
    try:
        peft_model.set_adapter(PREVIOUS)
        return adapter, base, evaluate(peft_model, batches, amp)
    finally:
        peft_model.set_adapter(ADAPTER)
        peft_model.delete_adapter(PREVIOUS)
