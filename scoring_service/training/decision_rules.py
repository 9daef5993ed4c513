"""What a model version decides with: its score thresholds and its transaction-level rules.

Thresholds (chosen on the *training* week's out-of-fold scores, 4 folds over cards, so the test
week is never used):
    decline: the lowest score whose precision is >= 0.8 (ties go to the safer, higher score);
    review: the highest score whose recall is >= 0.8, not above decline.

Policy (transaction level, used by the online cache path without the model), from the training
week's payments; each rule is learnt on the payments it fires on (``core.policy.Policy.payment_floor``
tries them in this order and the first that fires sets the floor; a rule later in the order is
learnt and measured on the payments the earlier ones leave):
    high_amount: the lowest amount A such that the fraud rate of the payments with amount >= A
        is >= 0.9 (searched over the observed amounts; above it nearly every payment is fraud);
    velocity_1h_decline: the lowest count N such that the payments below high_amount whose card
        made >= N payments in the hour up to them (``nb_tx_1h`` of ``features.payments_velocity``,
        the payment included) are at least 5 with a fraud rate >= 0.8 (inf if none: no rule);
    the ratio rules judge the ratio amount / customer's avg_amount_30d (the state's key, i.e. the
    average of the customer's payments before this one; feature ``amount_ratio_avg_30d``), only
    for payments below high_amount and below the velocity decline whose customer had at least
    ``min_history`` (3) payments in the 30 days before:
    amount_ratio_decline: the ratio above which the fraud rate is >= 0.8;
    amount_ratio_review: the 99.5th percentile of the ratio among genuine payments (at most decline);
    velocity_1h_review: the lowest N such that the payments left by the rules above with
        N <= nb_tx_1h < velocity_1h_decline are at least 5 with a fraud rate >= 0.3 (inf if none;
        at most the decline).
Each rule's ``*_fraud_rate`` is its fraud rate where it fires given the order (the review ratio's:
from the review up to the decline ratio, less the velocity review's payments); ``min_history`` is
recorded with them, and ``typical_amount``: the median amount of the training payments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scoring_service.core.features import payments_velocity
from scoring_service.core.policy import MIN_HISTORY

VELOCITY_DECLINE_RATE = 0.8  # the fraud rate the velocity decline rule must have where it fires
VELOCITY_REVIEW_RATE = 0.3
MIN_RULE_PAYMENTS = 5  # the fewest training payments a velocity rule may be learnt on


def choose_thresholds(
    y: np.ndarray, scores: np.ndarray, decline_precision: float = 0.8, review_recall: float = 0.8
) -> dict[str, float]:
    """decline: lowest score with precision >= 0.8 among payments scored >= it; review: highest
    score keeping recall >= 0.8 (capped at decline). Falls back to 0.9 / 0.5 without frauds."""
    y = np.asarray(y).astype(bool)
    if y.sum() == 0:
        return {"review": 0.5, "decline": 0.9}
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    tp = np.cumsum(yy)
    k = np.arange(1, len(s) + 1)
    # only positions at the end of a run of equal scores are achievable thresholds
    last = np.r_[s[1:] != s[:-1], True]
    prec = tp / k
    rec = tp / y.sum()
    ok = np.flatnonzero(last & (prec >= decline_precision))
    decline = float(s[ok.max()]) if len(ok) else float(min(1.0, s.max()))
    okr = np.flatnonzero(last & (rec >= review_recall))
    review = float(s[okr.min()]) if len(okr) else float(s.min())
    review = min(review, decline)
    return {"review": review, "decline": decline}


def _lowest_amount_with_rate(amount: np.ndarray, y: np.ndarray, min_rate: float) -> float:
    """The lowest amount A such that, for A and every observed amount above it, the fraud rate of
    the payments with amount >= that amount is >= ``min_rate`` (above ``max(amount)`` if none)."""
    order = np.argsort(-amount, kind="stable")
    a_sorted, y_sorted = amount[order], y[order]
    rate_from_top = np.cumsum(y_sorted) / np.arange(1, len(y_sorted) + 1)
    last = np.r_[a_sorted[1:] != a_sorted[:-1], True]  # the end of each run of equal amounts
    ok = np.flatnonzero(last & (rate_from_top >= min_rate))
    bad = np.flatnonzero(last & (rate_from_top < min_rate))
    first_bad = bad.min() if len(bad) else len(a_sorted)
    ok = ok[ok < first_bad]
    return float(a_sorted[ok.max()]) if len(ok) else float(amount.max() + 1.0 if len(amount) else 1e9)


def _lowest_count_with_rate(
    count: np.ndarray, y: np.ndarray, min_rate: float, below: float = float("inf"), min_payments: int = MIN_RULE_PAYMENTS
) -> float:
    """The lowest observed count N such that the payments with N <= count < ``below`` are at least
    ``min_payments`` and have a fraud rate >= ``min_rate`` (inf if there is none)."""
    for n in np.unique(count[count < below]):
        m = (count >= n) & (count < below)
        if m.sum() >= min_payments and y[m].mean() >= min_rate:
            return float(n)
    return float("inf")


def _fraud_rate(fires: np.ndarray, y: np.ndarray) -> float:
    return float(y[fires].mean()) if fires.any() else 0.0


def learn_policy(
    payments: pd.DataFrame, features: pd.DataFrame, min_history: float = MIN_HISTORY, velocity: pd.DataFrame | None = None
) -> dict[str, float]:
    """Transaction-level policy values from labelled payments (see the module docstring).

    Each rule's threshold and fraud rate are learnt on the payments it would fire on, in the
    order ``Policy.payment_floor`` tries the rules: the high-amount rule on every payment; the
    velocity decline below ``high_amount``; the amount-ratio rules below ``high_amount``, outside
    the velocity decline, and when the customer had at least ``min_history`` payments in the 30
    days before (the feature ``customer_nb_tx_30d`` counts the payment itself); the velocity review
    on what the decline rules leave; the review ratio's rate between the review and the decline
    ratios, outside the velocity review. ``velocity``: ``payments_velocity(payments)`` unless given
    (e.g. the rows of ``payments``, in order, of the velocity of a longer frame, so that the first
    hour of ``payments`` sees the payments before it).
    """
    y = payments["is_fraud"].to_numpy() == 1
    amount = payments["amount"].to_numpy(np.float64)
    high_amount = _lowest_amount_with_rate(amount, y, 0.9)
    below_high = amount < high_amount

    vel = payments_velocity(payments) if velocity is None else velocity
    n_1h = vel["nb_tx_1h"].to_numpy(np.float64)
    v_decline = _lowest_count_with_rate(n_1h[below_high], y[below_high], VELOCITY_DECLINE_RATE)
    v_decline_fires = below_high & (n_1h >= v_decline)

    # amount / the customer's average of the previous 30 days (the state's avg_amount_30d). A
    # customer whose earlier amounts are all 0 has a ratio of 1 here and no ratio rule online:
    # below any threshold either way.
    ratio = features["amount_ratio_avg_30d"].to_numpy(np.float64)
    history = features["customer_nb_tx_30d"].to_numpy(np.float64) - 1.0
    judged = (history >= min_history) & below_high & ~v_decline_fires
    r, yr = ratio[judged], y[judged]
    review = float(np.quantile(r[~yr], 0.995)) if (~yr).any() else 3.0
    decline = review
    if yr.any():
        grid = np.unique(np.quantile(r, np.linspace(0.9, 1.0, 201)))
        for g in grid:
            m = r >= g
            if m.sum() >= 5 and yr[m].mean() >= 0.8:
                decline = float(g)
                break
        else:
            decline = float(max(review, np.quantile(r[yr], 0.5)))
    decline = max(decline, review)
    ratio_decline_fires = judged & (ratio >= decline)

    # the velocity review judges what the rules before it leave
    left = below_high & ~v_decline_fires & ~ratio_decline_fires
    v_review = min(_lowest_count_with_rate(n_1h[left], y[left], VELOCITY_REVIEW_RATE, below=v_decline), v_decline)
    v_review_fires = left & (n_1h >= v_review) & (n_1h < v_decline)
    ratio_review_fires = judged & ~v_review_fires & (ratio >= review) & (ratio < decline)

    # How often each rule was right in training where it fires: the score a payment gets when it does.
    return {
        "amount_ratio_review": review,
        "amount_ratio_decline": decline,
        "high_amount": high_amount,
        "min_history": float(min_history),
        "high_amount_fraud_rate": _fraud_rate(~below_high, y),
        "amount_ratio_decline_fraud_rate": _fraud_rate(ratio_decline_fires, y),
        "amount_ratio_review_fraud_rate": _fraud_rate(ratio_review_fires, y),
        "velocity_1h_decline": v_decline,
        "velocity_1h_review": v_review,
        "velocity_1h_decline_fraud_rate": _fraud_rate(v_decline_fires, y),
        "velocity_1h_review_fraud_rate": _fraud_rate(v_review_fires, y),
        "typical_amount": float(np.median(amount)) if len(amount) else 0.0,
    }
