"""Retention: does an adapter still talk like its base on things unrelated to the persona?

An adapter can learn its persona's facts and forget how to answer anything else. The gate
measures that on GENERAL_PROMPTS, general requests no persona's data covers: the base
model answers each greedily (its *reference answers*, in the persona's own prompt format),
then the adapter's next-token distributions along those answers are compared with the
base's as the mean per-token KL divergence KL(base || adapter), in nats. An adapter that
changed nothing scores 0; one that fell into repeating its training answers scores
several nats. The bound (INGS_GATE_MAX_RETENTION_KL) was chosen by measurement on
SmolLM2-135M-Instruct (bench/RESULTS.md, "Default plan").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import IGNORE_INDEX, Encoded, PromptFormat, collate, end_of_turn_ids, prompt_ids

# Short, varied, persona-free requests: facts, instructions, arithmetic, writing, advice.
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in one sentence.",
    "Write a haiku about autumn.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "How do I boil an egg?",
    "List the planets of the solar system.",
    "What does a thermometer measure?",
    "Write one sentence describing the sea.",
)
# Replay: other general requests, never scored by the retention check.
REPLAY_PROMPTS = (
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water?",
    "Give me a synonym for happy.",
    "How many days are in a leap year?",
    "What is the largest ocean on Earth?",
    "Write a short poem about rain.",
    "What is the capital of Japan?",
    "Explain gravity to a child.",
    "Name three primary colours.",
    "What is 15 plus 27?",
    "How do plants drink water?",
    "Who wrote Romeo and Juliet?",
    "What is the opposite of cold?",
    "Suggest a healthy breakfast.",
    "What language is spoken in Brazil?",
    "Describe a cat in one sentence.",
    "What is the speed of light?",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
    "Give me a tip for learning a new language.",
    "What is the chemical symbol for gold?",
    "Why do leaves change colour in autumn?",
    "What is a noun?",
    "Name a famous painter.",
)
REFERENCE_TOKENS = 32
GENERATION_BATCH = 8


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, fmt: PromptFormat, prompts: Sequence[str], max_new_tokens: int) -> list[Encoded]:
    """Greedy answers of `model` to `prompts` rendered in `fmt` (as training renders them):
    each an `Encoded` whose ids are the prompt, the answer and, when the model ended it, the
    end-of-turn token. Batched with left padding, GENERATION_BATCH prompts at a time."""
    model.eval()
    stops = sorted(end_of_turn_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    out: list[Encoded] = []
    for start in range(0, len(prompts), GENERATION_BATCH):
        rendered = [prompt_ids(tokenizer, fmt, p) for p in prompts[start : start + GENERATION_BATCH]]
        width = max(len(r) for r in rendered)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rendered], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rendered], device=device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            top_p=None,
            top_k=None,
            temperature=None,
        )
        for prompt, row in zip(rendered, generated[:, width:].tolist(), strict=True):
            ends = [i for i, t in enumerate(row) if t in stops]
            answer = row[: ends[0] + 1] if ends else row
            out.append(Encoded(ids=prompt + answer, prompt_len=len(prompt)))
    return out


def reference_answers(model: Any, tokenizer: Any, fmt: PromptFormat) -> list[Encoded]:
    """The base model's greedy answers to GENERAL_PROMPTS in `fmt`, REFERENCE_TOKENS at most
    each, for the retention check (`base_answers`)."""
    return base_answers(model, tokenizer, fmt, GENERAL_PROMPTS)


def replay_examples(model: Any, tokenizer: Any, fmt: PromptFormat, count: int) -> list[Encoded]:
    """`count` (at most len(REPLAY_PROMPTS)) of the base model's own greedy answers to
    REPLAY_PROMPTS in `fmt`, as training examples: mixed into a run, they hold the adapter to
    what the base already says about everything else (self-distillation replay, against
    forgetting; bench/RESULTS.md "Default plan" measured it). Disjoint from GENERAL_PROMPTS,
    so the retention check is never scored on prompts the run trained on."""
    return base_answers(model, tokenizer, fmt, REPLAY_PROMPTS)[: max(0, count)] if count > 0 else []


def base_answers(model: Any, tokenizer: Any, fmt: PromptFormat, prompts: tuple[str, ...]) -> list[Encoded]:
    """The greedy answers of `model` (call before any adapter is attached) to `prompts` in
    `fmt`, REFERENCE_TOKENS tokens at most each; empty answers are dropped.

    Kept per loaded base, format and prompt set (the worker keeps its base loaded between
    jobs): about 6 s for 12 prompts on 2 cores with SmolLM2-135M, paid once per persona
    description."""
    key = (id(model), str(getattr(model, "name_or_path", "")), fmt, prompts)
    if key not in _ANSWERS:
        answers = greedy(model, tokenizer, fmt, prompts, REFERENCE_TOKENS)
        if len(_ANSWERS) >= ANSWER_CACHE:
            _ANSWERS.pop(next(iter(_ANSWERS)))
        _ANSWERS[key] = [a for a in answers if len(a.ids) > a.prompt_len]
    return _ANSWERS[key]


ANSWER_CACHE = 64
_ANSWERS: dict[tuple[int, str, PromptFormat, tuple[str, ...]], list[Encoded]] = {}


@torch.no_grad()
def retention_kl(peft_model: Any, references: Sequence[Encoded], pad_id: int, amp: torch.dtype | None) -> float:
    """Mean per-token KL(base || adapter), in nats, over the answer tokens of `references`,
    with the adapter of `peft_model` active against the same model with it disabled."""
    peft_model.eval()
    device = next(peft_model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(references), GENERATION_BATCH):
        batch = collate(references[start : start + GENERATION_BATCH], pad_id, device)
        adapted = _log_probs(peft_model, batch, amp)
        with peft_model.disable_adapter():
            base = _log_probs(peft_model, batch, amp)
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        kl = (base.exp() * (base - adapted)).sum(-1)
        total += float(kl[answer].sum())
        count += int(answer.sum())
    return total / max(count, 1)


def _log_probs(model: Any, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> torch.Tensor:
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)
