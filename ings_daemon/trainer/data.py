"""Examples to tensors: the prompt format, tokenising with the loss on output tokens only,
the held-out split, and padding into batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..contract.events import TrainExample
from ..contract.ids import digest

# The adapter learns to answer in this format; generation with it must use the same.
PROMPT_TEMPLATE = "### Input:\n{input}\n### Response:\n"
EVAL_MIN_EXAMPLES = 20
IGNORE_INDEX = -100


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int  # tokens before this position carry no loss


def split_examples(examples: Sequence[TrainExample]) -> tuple[list[TrainExample], list[TrainExample]]:
    """(train, held-out): 10% (at least 2) held out from 20 examples up, chosen by id hash
    so the same examples always land on the same side."""
    if len(examples) < EVAL_MIN_EXAMPLES:
        return list(examples), []
    n_eval = max(2, len(examples) // 10)
    ranked = sorted(examples, key=lambda e: (digest("eval-split", e.id), e.id))
    held = {id(e) for e in ranked[:n_eval]}
    return [e for e in examples if id(e) not in held], [e for e in examples if id(e) in held]


def encode(tokenizer: Any, example: TrainExample, max_len: int) -> Encoded:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = list(tokenizer.encode(PROMPT_TEMPLATE.format(input=example.input), add_special_tokens=False))
    output = [*tokenizer.encode(example.output, add_special_tokens=False), eos]
    budget = max_len - len(bos)
    if len(prompt) + len(output) > budget:
        # Keep at least half the window for the output; the prompt loses its start, not the
        # "### Response:" marker at its end.
        keep_out = min(len(output), max(budget - len(prompt), budget // 2))
        keep_prompt = budget - keep_out
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        output = output[:keep_out]
    return Encoded(ids=bos + prompt + output, prompt_len=len(bos) + len(prompt))


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(item.ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.ids)
        ids[row, :n] = torch.tensor(item.ids)
        mask[row, :n] = 1
        labels[row, item.prompt_len : n] = torch.tensor(item.ids[item.prompt_len :])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def length_grouped(lengths: Sequence[int], batch_size: int, order: torch.Generator) -> list[list[int]]:
    """One epoch's batches as lists of indices: shuffled, then each run of 50 batches sorted
    by length so a batch pads little, then the batches shuffled again.

    The rule of transformers' `LengthGroupedSampler` (`get_length_grouped_indices`, mega-batches
    of 50 batches); the last shuffle keeps long and short batches mixed through the epoch.
    """
    perm = torch.randperm(len(lengths), generator=order).tolist()
    mega = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(perm), mega):
        group = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=order).tolist()]


def chunks(items: Sequence[Encoded], size: int) -> list[Sequence[Encoded]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
