"""The quality gate's verdict on its figures: every check, and figures that are not numbers."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from ings_daemon.trainer.gate import ADVICE, GateFigures, GateLimits, QualityGateFailed, verdict

GOOD = GateFigures(
    eval_loss=1.8, base_eval_loss=2.4, fit_loss=0.01, base_fit_loss=2.8, retention_kl=1.0
)  # the default plan on SmolLM2-135M (bench/RESULTS.md)


def test_each_check_fails_on_its_own() -> None:
    assert verdict(GateLimits(), GOOD) == ("passed", [])
    cases = {
        "held-out loss": GateFigures(**{**GOOD.__dict__, "eval_loss": 2.5}),
        "learned too little": GateFigures(**{**GOOD.__dict__, "fit_loss": 1.75}),  # 37% removed
        "damaged general answers": GateFigures(**{**GOOD.__dict__, "retention_kl": 1.5}),
    }
    for reason, figures in cases.items():
        decision, reasons = verdict(GateLimits(), figures)
        assert decision == "failed" and len(reasons) == 1 and reason in reasons[0], reasons
        assert QualityGateFailed(figures, reasons).advice in ADVICE.values()
    assert verdict(GateLimits(enabled=False), cases["held-out loss"]) == ("off", [])
    assert verdict(GateLimits(), GateFigures(fit_loss=0.1, base_fit_loss=2.0))[0] == "not_gated"


FIGURE = st.none() | st.floats(allow_nan=True, allow_infinity=True)


@given(FIGURE, FIGURE, FIGURE, FIGURE, FIGURE)
def test_a_figure_that_is_not_a_number_never_passes(
    eval_loss: float | None, base: float | None, fit: float | None, base_fit: float | None, kl: float | None
) -> None:
    figures = GateFigures(
        eval_loss=eval_loss, base_eval_loss=base, fit_loss=fit, base_fit_loss=base_fit, retention_kl=kl
    )
    decision, reasons = verdict(GateLimits(), figures)
    if any(v is not None and not math.isfinite(v) for v in figures.__dict__.values()) and decision != "not_gated":
        assert decision == "failed" and reasons
