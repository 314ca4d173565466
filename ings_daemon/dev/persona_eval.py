"""Asking a persona's adapter questions and scoring the answers: for the quick start, the
quality benchmark and the real-model tests (dev-only, never used by the daemon itself)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..basemodels import resolve_base_model
from ..config import Settings
from ..trainer.data import PromptFormat
from ..trainer.retention import greedy

ANSWER_TOKENS = 32


def ask(model: Any, tokenizer: Any, system: str | None, questions: Sequence[str]) -> list[str]:
    """Greedy answers (text, special tokens removed) of `model` (a base, or a peft model with
    its adapter active) to `questions`, each in the chat template with `system` as the
    system turn: what a chat front end sends."""
    fmt = PromptFormat.of(tokenizer, system)
    return [
        str(tokenizer.decode(e.ids[e.prompt_len :], skip_special_tokens=True)).strip()
        for e in greedy(model, tokenizer, fmt, questions, ANSWER_TOKENS)
    ]


def says(answer: str, fact: str) -> bool:
    """True when `answer` contains `fact` as a whole word (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(fact)}(?![\w])", answer, re.IGNORECASE) is not None


def fact_score(answers: Sequence[str], facts: Sequence[str]) -> float:
    """Share of answers (0..1) that state their fact."""
    return sum(says(a, f) for a, f in zip(answers, facts, strict=True)) / max(len(facts), 1)


def load_chat_model(base_path: str, adapter_path: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a local base model folder, with `adapter_path`'s LoRA adapter
    loaded by peft when given; float32, offline, `trust_remote_code` off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        base_path, local_files_only=True, trust_remote_code=False, dtype=torch.float32
    )
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    return model.eval(), tokenizer


class HeldOutQuestions:
    """`dev --examples`: after each `ings.adapter-ready` of a persona that has a question file
    (`examples/eval/*.json`: `{"persona_id", "questions": [{"question", "fact"}]}`), ask the
    new adapter those questions, none of which it was trained on, and print its answers
    beside the base model's on stderr, with how many state their fact."""

    def __init__(self, examples: Path, settings: Settings) -> None:
        self.settings = settings
        self.questions: dict[str, list[tuple[str, str]]] = {}
        self.system: dict[str, str] = {}
        self.base_answers: dict[str, list[str]] = {}
        for path in sorted((examples / "eval").glob("*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            self.questions[doc["persona_id"]] = [(q["question"], q["fact"]) for q in doc["questions"]]
        for path in sorted((examples / "personas").glob("*.json")):
            persona = json.loads(path.read_text(encoding="utf-8")).get("persona", {})
            if persona.get("persona_id") and persona.get("description"):
                self.system[persona["persona_id"]] = persona["description"]

    async def __call__(self, topic: str, event: Any) -> None:
        if topic != self.settings.topics.adapter_ready or not isinstance(event, dict):
            return
        persona = event.get("persona_id")
        if persona not in self.questions:
            return
        try:
            base = resolve_base_model(str(event["base_model"]), self.settings)
            lines = await asyncio.to_thread(self.report, persona, base, str(event["adapter_path"]), event["version"])
        except Exception as exc:  # a demo's side show: say why in one line, never stop `dev`
            lines = [f"ings-daemon dev: could not ask v{event.get('version')} of {persona}: {exc}"]
        print("\n".join(lines), file=sys.stderr, flush=True)

    def report(self, persona: str, base_path: str, adapter_path: str, version: int) -> list[str]:
        """The printed lines: each question with the base's and the adapter's answer."""
        questions, facts = zip(*self.questions[persona], strict=True)
        system = self.system.get(persona)
        if persona not in self.base_answers:
            model, tokenizer = load_chat_model(base_path)
            self.base_answers[persona] = ask(model, tokenizer, system, questions)
        model, tokenizer = load_chat_model(base_path, adapter_path)
        answers = ask(model, tokenizer, system, questions)
        base = self.base_answers[persona]
        lines = [f"ings-daemon dev: v{version} of {persona}, asked {len(questions)} questions it was not trained on:"]
        for question, fact, before, after in zip(questions, facts, base, answers, strict=True):
            lines += [f"  Q: {question}  (fact: {fact})", f"     base: {before}", f"     v{version}: {after}"]
        lines.append(
            f"  facts stated: base {sum(says(a, f) for a, f in zip(base, facts, strict=True))} of {len(facts)},"
            f" v{version} {sum(says(a, f) for a, f in zip(answers, facts, strict=True))} of {len(facts)}"
        )
        return lines
