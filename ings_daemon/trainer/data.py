"""Examples to tensors: the prompt format, tokenising with the loss on output tokens only,
the held-out split, and padding into batches.

The prompt format is the base model's own: when its tokenizer has a chat template, an
example is the conversation [system: the persona's description, user: input, assistant:
output] rendered by that template, which is what vLLM, LoRAX or Ollama render when they
serve the adapter. Without a template it is the plain `PROMPT_TEMPLATE` after BOS.
Either way the loss covers only the answer and the token that ends it (end-of-turn/EOS).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError

from ..contract.events import TrainExample
from ..contract.ids import digest

# The adapter learns to answer in this format; generation with it must use the same.
PROMPT_TEMPLATE = "### Input:\n{input}\n### Response:\n"
# Jobs of this many examples up hold some out and are gated (INGS_GATE_MIN_EXAMPLES).
GATE_MIN_EXAMPLES = 10
IGNORE_INDEX = -100
# An up-voted example appears this many times in a run's training set.
UP_WEIGHT = 2


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int  # tokens before this position carry no loss


def split_examples(
    examples: Sequence[TrainExample], min_examples: int = GATE_MIN_EXAMPLES, exclude: frozenset[str] = frozenset()
) -> tuple[list[TrainExample], list[TrainExample], bool]:
    """(train, held-out, clean): from `min_examples` examples up, 10% (at least 2) held out,
    chosen by id hash so the same examples always land on the same side.

    Held-out examples are taken from those not in `exclude` (what the adapter compared
    against was trained on); `clean` is False when too few such examples were left and the
    held-out split includes some of them, so that comparison would not be fair. Among the
    rest, examples with a paraphrase (`paraphrases`) that stays in training are held out
    first: a persona's fact given twice is then tested asked the other way, instead of
    being held out whole, which no adapter could answer (the gate refused a good adapter
    whose split had taken both examples of one fact).
    """
    if len(examples) < min_examples:
        return list(examples), [], True
    n_eval = max(2, len(examples) // 10)
    partners = paraphrases(examples)
    ranked = sorted(
        range(len(examples)), key=lambda i: (examples[i].id in exclude, digest("eval-split", examples[i].id))
    )
    held: list[int] = []
    for i in ranked:  # first pass: only examples one of whose paraphrases stays in training
        keeps_partner = bool(partners[i] - {*held, i})
        # ...and never two paraphrases of each other: each is the other's test.
        if len(held) < n_eval and examples[i].id not in exclude and keeps_partner and not partners[i] & {*held}:
            held.append(i)
    held += [i for i in ranked if i not in held][: n_eval - len(held)]
    chosen = set(held)
    clean = not any(examples[i].id in exclude for i in held)
    return (
        [e for i, e in enumerate(examples) if i not in chosen],
        [e for i, e in enumerate(examples) if i in chosen],
        clean,
    )


def supervised(examples: Sequence[TrainExample]) -> list[TrainExample]:
    """The supervised set as feedback shapes it: a corrected answer replaced by its
    correction, a down-voted answer (without one) left out; up-votes stay marked, for
    `weighted`."""
    out = []
    for e in examples:
        if e.correction:
            out.append(e.model_copy(update={"output": e.correction, "correction": None}))
        elif e.feedback != "down":
            out.append(e)
    return out


def weighted(examples: Sequence[TrainExample]) -> list[TrainExample]:
    """`examples` with each up-voted one repeated to UP_WEIGHT copies."""
    return [copy for e in examples for copy in [e] * (UP_WEIGHT if e.feedback == "up" else 1)]


_WORD = re.compile(r"[^\W\d_]{3,}|\d+", re.UNICODE)
# Words too common to say two examples are about the same thing.
_STOPWORDS = frozenset(
    (
        *("the", "and", "you", "your", "are", "was", "were", "what", "which", "who", "whom", "how", "why"),
        *("when", "where", "for", "with", "that", "this", "have", "has", "had", "yes", "not", "but", "all"),
        *("can", "our", "its", "his", "her", "they", "them", "their", "from", "into", "about", "there"),
        *("here", "does", "did", "just", "also", "very"),
    )
)
PARAPHRASE_JACCARD = 0.25


def paraphrases(examples: Sequence[TrainExample]) -> list[set[int]]:
    """For each example, the indices of the others that say much the same: a Jaccard
    similarity of at least PARAPHRASE_JACCARD between their content words (input and output,
    lower case, stopwords out). "My cat is called Pistachio." and "Yes, a cat named
    Pistachio." are paraphrases (0.4 with their questions); two tech-lead opinions are not.
    O(n^2) over at most INGS_MAX_JOB_EXAMPLES examples."""
    words = [{w for w in _WORD.findall(f"{e.input} {e.output}".lower()) if w not in _STOPWORDS} for e in examples]
    out: list[set[int]] = [set() for _ in examples]
    for i, a in enumerate(words):
        for j in range(i + 1, len(words)):
            b = words[j]
            if a and b and len(a & b) / len(a | b) >= PARAPHRASE_JACCARD:
                out[i].add(j)
                out[j].add(i)
    return out


@dataclass(frozen=True)
class PromptFormat:
    """How a run renders its examples: the tokenizer's chat template (None: the plain format)
    and the system message (the persona's description; chat templates only)."""

    chat_template: str | None = None
    system: str | None = None

    @classmethod
    def of(cls, tokenizer: Any, system: str | None = None) -> PromptFormat:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one renders
            template = template.get("default")
        if not isinstance(template, str) or not template:
            return cls()
        return cls(template, system or None)

    @property
    def name(self) -> str:
        return "plain" if self.chat_template is None else "chat_template"

    def describe(self) -> dict[str, Any]:
        """For the manifest and `ings.adapter-ready`: the format, the template's sha256 (hex
        of its UTF-8 text) and the system message."""
        digest_ = hashlib.sha256(self.chat_template.encode()).hexdigest() if self.chat_template else None
        return {"format": self.name, "chat_template_sha256": digest_, "system": self.system}


def _render(tokenizer: Any, fmt: PromptFormat, user: str, answer: str | None) -> str:
    """The chat template's text for [system, user(, assistant)], with the generation prompt
    when there is no answer. A template that refuses a system turn (some do) gets the
    system message as the user turn's first paragraph instead."""
    turns = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": answer}] if answer else [])
    system = [{"role": "system", "content": fmt.system}] if fmt.system else []
    try:
        text = tokenizer.apply_chat_template(
            system + turns, chat_template=fmt.chat_template, tokenize=False, add_generation_prompt=answer is None
        )
    except TemplateError:
        if not fmt.system:
            raise
        turns[0] = {"role": "user", "content": f"{fmt.system}\n\n{user}"}
        text = tokenizer.apply_chat_template(
            turns, chat_template=fmt.chat_template, tokenize=False, add_generation_prompt=answer is None
        )
    return str(text)


# Contents are tokenised with special-token strings as plain text: an example that writes
# "<|im_end|><|im_start|>system" or "</s>" must not forge a turn or end its answer early.
# The template's own text keeps its special tokens. A slot marks where a content goes
# (U+2063, an invisible separator no template writes).
_SLOT = "\u2063ings-slot-{}\u2063"
_SLOTS = re.compile("\u2063ings-slot-([0-9])\u2063")


def _literal(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _chat_ids(tokenizer: Any, fmt: PromptFormat, user: str, answer: str | None) -> list[int]:
    """Token ids of the chat template's rendering of [system, user(, assistant)]."""
    contents = [user, answer or "", fmt.system or ""]
    slotted = PromptFormat(fmt.chat_template, _SLOT.format(2) if fmt.system else None)
    text = _render(tokenizer, slotted, _SLOT.format(0), _SLOT.format(1) if answer is not None else None)
    ids: list[int] = []
    for i, piece in enumerate(_SLOTS.split(text)):
        if i % 2:
            ids += _literal(tokenizer, contents[int(piece)])
        elif piece:
            ids += list(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def prompt_ids(tokenizer: Any, fmt: PromptFormat, user: str) -> list[int]:
    """The token ids a served adapter must be given for `user`: exactly the prompt it was
    trained on (BOS + PROMPT_TEMPLATE, or the chat template with its generation prompt)."""
    if fmt.chat_template is None:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        before, after = PROMPT_TEMPLATE.split("{input}")
        return bos + _literal(tokenizer, before) + _literal(tokenizer, user) + _literal(tokenizer, after)
    return _chat_ids(tokenizer, fmt, user, None)


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> frozenset[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation EOS ids
    (chat models often stop on an end-of-turn token such as <|im_end|> or <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured} if isinstance(configured, int) else set()
    return frozenset(ids)


def encode(
    tokenizer: Any,
    example: TrainExample,
    max_len: int,
    fmt: PromptFormat | None = None,
    stops: frozenset[int] = frozenset(),
) -> Encoded:
    """An example as token ids, loss from `prompt_len` on: the answer and its end token.

    Longer than `max_len` tokens, the prompt loses its start and the answer its end, the
    answer keeping at least half the window. Raises ValueError when the tokenizer has no EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token")
    fmt = fmt or PromptFormat()
    prompt = prompt_ids(tokenizer, fmt, example.input)
    if fmt.chat_template is None:
        output = [*_literal(tokenizer, example.output), eos]
    else:
        full = _chat_ids(tokenizer, fmt, example.input, example.output)
        # A template that renders the user turn otherwise once answered: the answer alone.
        answer = full[len(prompt) :] if full[: len(prompt)] == prompt else _literal(tokenizer, example.output)
        # Up to and including the last end token: what the template adds after it (a
        # newline) is not the model's to say.
        ends = [i for i, t in enumerate(answer) if t in stops or t == eos]
        output = answer[: ends[-1] + 1] if ends else [*answer, eos]
    # The plain format's BOS stays; the rest of the prompt loses its start, not the
    # "### Response:" (or the chat template's generation prompt) at its end.
    lead = 1 if fmt.chat_template is None and tokenizer.bos_token_id is not None else 0
    head, prompt = prompt[:lead], prompt[lead:]
    budget = max_len - len(head)
    if len(prompt) + len(output) > budget:
        keep_out = min(len(output), max(budget - len(prompt), budget // 2))
        keep_prompt = budget - keep_out
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        output = output[:keep_out]
    return Encoded(ids=head + prompt + output, prompt_len=len(head) + len(prompt))


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
