"""The promotion gate's rule (``scoring_service.training.promotion``), on synthetic evaluation weeks."""

from __future__ import annotations

import numpy as np

from scoring_service.training import promotion
from scoring_service.training.promotion import DayScores, decide


def _week(candidate_skill: float, active_skill: float, *, seed: int = 1, n: int = 400,
          cp_candidate: float = 0.3, cp_active: float = 0.3) -> list[DayScores]:
    """Seven days; a model's score is its skill times the label plus noise (skill 0: a random model)."""
    rng = np.random.default_rng(seed)
    days = []
    for _ in range(7):
        y = (rng.random(n) < 0.05).astype(int)
        y[0] = 1
        days.append(DayScores(y, candidate_skill * y + rng.random(n), active_skill * y + rng.random(n),
                              cp_candidate, cp_active))
    return days


def _report(days: list[DayScores], which: str, decline_rate: float = 0.01, genuine: int = 500) -> dict:
    y = np.concatenate([d.y for d in days])
    s = np.concatenate([getattr(d, which) for d in days])
    from scoring_service.core.metrics import average_precision

    cp = float(np.mean([getattr(d, f"cp_{which}") for d in days]))
    return {"metrics": {"auc_roc": 0.5, "average_precision": average_precision(y, s), "card_precision_at_100": cp},
            "new_cards": {"genuine": genuine, "genuine_decline_rate": decline_rate, "genuine_review_rate": 0.1}}


def test_a_better_candidate_is_promoted() -> None:
    days = _week(1.0, 0.3)
    gate = decide(_report(days, "candidate"), _report(days, "active"), days)
    assert gate.promote, gate.reasons
    assert gate.figures["average_precision"]["bootstrap_low"] > 0


def test_an_equal_candidate_is_promoted_the_bootstrap_is_paired() -> None:
    days = _week(0.8, 0.8)
    gate = decide(_report(days, "candidate"), _report(days, "active"), days)
    assert gate.promote, gate.reasons


def test_a_worse_candidate_is_refused_naming_ap() -> None:
    days = _week(0.0, 1.0)  # the candidate scores at random (labels shuffled)
    gate = decide(_report(days, "candidate"), _report(days, "active"), days)
    assert not gate.promote
    [ap] = [r for r in gate.reasons if r.startswith("AP ")]
    assert ap.endswith("worse") and "vs active" in ap
    assert "keep as shadow" in gate.summary()


def test_a_worse_card_precision_is_refused_naming_cp() -> None:
    days = _week(0.8, 0.8, cp_candidate=0.10, cp_active=0.40)
    gate = decide(_report(days, "candidate"), _report(days, "active"), days)
    assert not gate.promote
    assert [r for r in gate.reasons if r.startswith("CP@100 ") and r.endswith("worse")]


def test_more_new_card_genuine_declines_are_refused_beyond_the_noise() -> None:
    days = _week(0.8, 0.8)
    active = _report(days, "active", decline_rate=0.01, genuine=2000)
    bound = promotion.new_card_bound(0.01, 2000)
    assert 0.01 < bound < 0.02
    worse = decide(_report(days, "candidate", decline_rate=0.03), active, days)
    assert not worse.promote
    assert [r for r in worse.reasons if r.startswith("new-card genuine-decline rate") and r.endswith("worse")]
    within_noise = decide(_report(days, "candidate", decline_rate=bound - 1e-6), active, days)
    assert within_noise.promote, within_noise.reasons


def test_no_active_version_promotes_a_candidate_with_metrics() -> None:
    days = _week(0.5, 0.5)
    assert decide(_report(days, "candidate"), None).promote
    assert not decide({"metrics": {}}, None).promote


def test_an_active_version_that_cannot_be_evaluated_is_not_replaced_silently() -> None:
    days = _week(1.0, 0.0)
    gate = decide(_report(days, "candidate"), None, active_error="xgb-1 does not load: sha256 mismatch")
    assert not gate.promote and "cannot be evaluated" in gate.reasons[0]


def test_the_bootstrap_is_seeded() -> None:
    days = _week(0.5, 0.4)
    a, b = promotion.bootstrap_differences(days), promotion.bootstrap_differences(days)
    assert np.array_equal(a["average_precision"], b["average_precision"])
