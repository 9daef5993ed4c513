"""The promotion gate of ``fraudscore retrain``: is the candidate at least as good as the active version?

Pure functions over what the evaluation week gave (docs/model.md, "Retraining and the promotion gate"):

* **AP and CP@100, not worse beyond the noise.** The evaluation week's days are resampled with
  replacement (``DRAWS`` draws, seed ``SEED``), the same days for both models (a paired bootstrap):
  AP over the drawn days' payments, CP@100 as the mean of the drawn days' card precisions (the
  handbook's CP@100 is the mean over days). The gate needs the ``QUANTILE`` (5th percentile) of
  each difference candidate - active to be >= ``-MARGIN``: the candidate is promoted only when,
  across plausible weeks like this one, it is no worse than ``MARGIN`` on both.
* **New cards, not declined more.** The genuine-decline rate of payments 1-10 of the cards first
  seen in the week (each model's own thresholds and policy) must be at most the active version's
  plus its noise: ``NEW_CARD_Z`` (2) binomial standard errors of that rate over the slice's ``n``
  genuine payments, ``sqrt(max(rate, 1/n) * (1 - rate) / n)``, and at least ``NEW_CARD_EPSILON``.
  (A few hundred new-card payments a week decline a handful of genuine ones: 10 against 13 is
  noise, not a worse model.)
* **No active version** (a first deployment): the candidate is promoted if it has metrics.
* **An active version that cannot be evaluated** (it does not load, or its features are not the
  service's): refused, with the reason; an operator decides (``fraudscore model activate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoring_service.core.metrics import average_precision

DRAWS = 200
SEED = 0
QUANTILE = 0.05
MARGIN = 0.02  # absolute, on AP and on CP@100
NEW_CARD_Z = 2.0  # binomial standard errors allowed on the new-card genuine-decline rate
NEW_CARD_EPSILON = 0.001  # the least allowance: 0.1 % of genuine payments


@dataclass(frozen=True)
class DayScores:
    """One evaluation day: its labels, both models' scores, both models' card precision@100."""

    y: np.ndarray
    candidate: np.ndarray
    active: np.ndarray
    cp_candidate: float
    cp_active: float


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    figures: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return ("promote: " if self.promote else "keep as shadow: ") + "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": list(self.reasons), "figures": dict(self.figures)}


def bootstrap_differences(days: Sequence[DayScores], draws: int = DRAWS, seed: int = SEED) -> dict[str, np.ndarray]:
    """``draws`` paired bootstrap differences candidate - active of AP and CP@100, days resampled."""
    rng = np.random.default_rng(seed)
    n = len(days)
    ap, cp = np.empty(draws), np.empty(draws)
    cp_c = np.array([d.cp_candidate for d in days], dtype=np.float64)
    cp_a = np.array([d.cp_active for d in days], dtype=np.float64)
    for i in range(draws):
        pick = rng.integers(0, n, n)
        y = np.concatenate([days[j].y for j in pick])
        if y.min() == y.max():  # a draw without a fraud (or only frauds): AP says nothing
            ap[i] = 0.0
        else:
            ap[i] = (average_precision(y, np.concatenate([days[j].candidate for j in pick]))
                     - average_precision(y, np.concatenate([days[j].active for j in pick])))
        cp[i] = float(np.nanmean(cp_c[pick]) - np.nanmean(cp_a[pick]))
    return {"average_precision": ap, "card_precision_at_100": cp}


def new_card_bound(active_rate: float, genuine: int) -> float:
    """The highest new-card genuine-decline rate a candidate may have: the active's plus its noise."""
    n = max(genuine, 1)
    noise = NEW_CARD_Z * math.sqrt(max(active_rate, 1.0 / n) * (1.0 - active_rate) / n)
    return active_rate + max(NEW_CARD_EPSILON, noise)


def decide(
    candidate: dict[str, Any] | None,
    active: dict[str, Any] | None,
    days: Sequence[DayScores] = (),
    *,
    active_error: str | None = None,
    margin: float = MARGIN,
    quantile: float = QUANTILE,
    draws: int = DRAWS,
    seed: int = SEED,
) -> GateDecision:
    """The gate. ``candidate``/``active``: the evaluation reports (``retrain.evaluate_version``):
    ``metrics`` and ``new_cards``; ``days``: the week's per-day scores of both; ``active`` None and
    no ``active_error``: there is no active version."""
    if not candidate or not candidate.get("metrics"):
        return GateDecision(False, ["the candidate has no evaluation metrics"])
    if active_error:
        return GateDecision(False, [f"the active version cannot be evaluated ({active_error}); "
                                    "promote by hand with `fraudscore model activate` if intended"])
    if active is None:
        return GateDecision(True, ["no active version: the candidate becomes the first one"])
    if not days:
        return GateDecision(False, ["no evaluation days to compare on"])
    reasons: list[str] = []
    figures: dict[str, Any] = {"margin": margin, "quantile": quantile, "draws": draws, "seed": seed}
    ok = True
    diffs = bootstrap_differences(days, draws, seed)
    for name, short in (("average_precision", "AP"), ("card_precision_at_100", "CP@100")):
        c, a = float(candidate["metrics"][name]), float(active["metrics"][name])
        low = float(np.quantile(diffs[name], quantile))
        figures[name] = {"candidate": c, "active": a, "difference": c - a, "bootstrap_low": low}
        passed = low >= -margin
        ok &= passed
        reasons.append(f"{short} {c:.4f} vs active {a:.4f} (5th percentile of the difference {low:+.4f} "
                       f"{'>=' if passed else '<'} -{margin}): {'ok' if passed else 'worse'}")
    nc_c, nc_a = candidate.get("new_cards") or {}, active.get("new_cards") or {}
    rc, ra = nc_c.get("genuine_decline_rate"), nc_a.get("genuine_decline_rate")
    if rc is None or ra is None:
        reasons.append("new-card genuine-decline rate: no new cards in the week, not compared")
    else:
        bound = new_card_bound(float(ra), int(nc_a.get("genuine") or 0))
        passed = float(rc) <= bound
        ok &= passed
        figures["new_card_genuine_decline_rate"] = {"candidate": rc, "active": ra, "bound": bound,
                                                    "genuine": nc_a.get("genuine")}
        reasons.append(f"new-card genuine-decline rate {rc:.4f} vs active {ra:.4f} (bound {bound:.4f} over "
                       f"{nc_a.get('genuine')} genuine payments): "
                       f"{'ok' if passed else 'worse'}")
    return GateDecision(bool(ok), reasons, figures)
