"""The quality gate: is a finished run worth announcing?

Three checks, each catching a failure the others miss (all losses are mean next-token
cross-entropy over answer tokens, in nats):

- held-out: the adapter's loss on held-out examples is below the base model's and, when
  there is a fair one to compare, the previous version's. Alone it passed an adapter that
  answered 0 of 12 facts: a little style learned lowers held-out loss too.
- learned: the adapter fits its own training examples: `learned = 1 - fit_loss /
  base_fit_loss` (the share of the base's loss on them that training removed) must reach
  INGS_GATE_MIN_LEARNED. The 0-of-12 run above removed 37%; runs that answered 10-12 of 12
  removed 91% or more (bench/RESULTS.md, "Default plan").
- retention: the adapter still answers general prompts as the base does (`retention.py`):
  mean per-token KL(base || adapter) at most INGS_GATE_MAX_RETENTION_KL.

Runs too small to hold examples out (INGS_GATE_MIN_EXAMPLES) are `not_gated`, though their
figures are still measured and reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import Settings
from ..contract.events import GateDecision

# Defaults of INGS_GATE_MIN_LEARNED and INGS_GATE_MAX_RETENTION_KL, chosen by measurement
# on SmolLM2-135M-Instruct (bench/RESULTS.md, "Default plan").
MIN_LEARNED: float = Settings.model_fields["ings_gate_min_learned"].default
MAX_RETENTION_KL: float = Settings.model_fields["ings_gate_max_retention_kl"].default
MIN_PREFERENCE: float = Settings.model_fields["ings_gate_min_preference"].default


@dataclass(frozen=True)
class GateLimits:
    enabled: bool = True
    min_learned: float = MIN_LEARNED
    max_retention_kl: float = MAX_RETENTION_KL
    min_preference: float = MIN_PREFERENCE


@dataclass(frozen=True)
class GateFigures:
    """What the gate measured on one run; None where it could not be measured."""

    eval_loss: float | None = None
    base_eval_loss: float | None = None
    previous_eval_loss: float | None = None
    fit_loss: float | None = None
    base_fit_loss: float | None = None
    retention_kl: float | None = None

    @property
    def learned(self) -> float | None:
        """1 - fit_loss / base_fit_loss: the share of the base's training loss removed."""
        if self.fit_loss is None or not self.base_fit_loss:
            return None
        return 1.0 - self.fit_loss / self.base_fit_loss

    def fields(self) -> dict[str, Any]:
        """The figures as event fields (`ings.tune-status`, AdapterMetrics), `learned` included."""
        rounded = {k: None if v is None else round(v, 6) for k, v in asdict(self).items()}
        learned = self.learned
        return {**rounded, "learned": None if learned is None else round(learned, 6)}


def verdict(limits: GateLimits, figures: GateFigures) -> tuple[GateDecision, list[str]]:
    """The decision and, when it failed, one reason per failed check (four decimals: runs on
    one base often differ in the third)."""
    if not limits.enabled:
        return "off", []
    f = figures
    if f.eval_loss is None or f.base_eval_loss is None:
        return "not_gated", []
    reasons: list[str] = []
    broken = [k for k, v in asdict(f).items() if v is not None and not math.isfinite(v)]
    if broken:  # NaN compares false both ways: it must never pass a check by default
        reasons.append(f"non-finite figures: {', '.join(broken)}")
    beaten = [f.base_eval_loss] + ([f.previous_eval_loss] if f.previous_eval_loss is not None else [])
    if not all(f.eval_loss < other for other in beaten):
        against = f"the base model's {f.base_eval_loss:.4f}"
        if f.previous_eval_loss is not None:
            against += f" and the previous version's {f.previous_eval_loss:.4f}"
        reasons.append(f"held-out loss {f.eval_loss:.4f} did not beat {against}")
    learned = f.learned
    if learned is not None and learned < limits.min_learned:
        reasons.append(
            f"learned too little of its examples: training loss {f.fit_loss:.4f} against the base's"
            f" {f.base_fit_loss:.4f} ({learned:.0%} removed, INGS_GATE_MIN_LEARNED is {limits.min_learned:.0%})"
        )
    if f.retention_kl is not None and f.retention_kl > limits.max_retention_kl:
        reasons.append(
            f"damaged general answers: retention KL {f.retention_kl:.4f} nats/token over"
            f" INGS_GATE_MAX_RETENTION_KL {limits.max_retention_kl}"
        )
    return ("failed" if reasons else "passed"), reasons


# What to change after each check failed, keyed by the start of its reason.
ADVICE = {
    "non-finite": "send a lower lora_config.learning_rate",
    "held-out": "add more or more varied examples",
    "learned": "send lora_config.max_steps higher (or a higher learning_rate), or add examples",
    "damaged": "send a lower lora_config.learning_rate or fewer max_steps, or add varied examples",
}


class QualityGateFailed(RuntimeError):
    def __init__(self, figures: GateFigures, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.figures = figures
        self.advice = "; ".join(a for key, a in ADVICE.items() if any(r.startswith(key) for r in reasons))


def preference_verdict(
    limits: GateLimits, accuracy: float | None, retention_kl: float | None
) -> tuple[GateDecision, list[str]]:
    """The decision on a preference phase (trainer/preference.py): at least
    INGS_GATE_MIN_PREFERENCE of its held-out (chosen, rejected) comparisons favour the chosen
    answer against the supervised parent (`preference.held_out_accuracy`), and general
    answers stayed within INGS_GATE_MAX_RETENTION_KL of the base's. Too few labels to hold
    any out: not_gated (retention is still checked)."""
    if not limits.enabled:
        return "off", []
    reasons: list[str] = []
    if accuracy is not None and not accuracy >= limits.min_preference:
        reasons.append(
            f"preferred the chosen answer in {accuracy:.0%} of held-out comparisons,"
            f" under INGS_GATE_MIN_PREFERENCE {limits.min_preference:.0%}"
        )
    if retention_kl is not None and not retention_kl <= limits.max_retention_kl:
        reasons.append(
            f"damaged general answers: retention KL {retention_kl:.4f} nats/token over"
            f" INGS_GATE_MAX_RETENTION_KL {limits.max_retention_kl}"
        )
    if reasons:
        return "failed", reasons
    return ("passed" if accuracy is not None else "not_gated"), []
