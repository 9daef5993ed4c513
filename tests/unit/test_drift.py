"""PSI (core/drift.py): the one definition the training profile, the live metric and the backtest share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scoring_service.core import drift


def test_psi_of_identical_distributions_is_zero() -> None:
    assert drift.psi([0.1] * 10, [0.1] * 10) == 0.0
    assert drift.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)  # counts are normalised


def test_psi_matches_the_textbook_formula() -> None:
    e, a = [0.5, 0.5], [0.25, 0.75]
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert drift.psi(e, a) == pytest.approx(expected)
    assert drift.psi(e, a) > 0


def test_an_empty_bin_is_rare_not_infinite() -> None:
    value = drift.psi([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(value) and value > 1.0


def test_different_bins_are_refused() -> None:
    with pytest.raises(ValueError, match="same bins"):
        drift.psi([0.5, 0.5], [1.0, 0.0, 0.0])


def test_decile_edges_give_ten_equal_shares_and_merge_ties() -> None:
    x = np.arange(1000, dtype=float)
    edges = drift.bin_edges(x)
    assert len(edges) == 9
    assert drift.shares(x, edges) == pytest.approx([0.1] * 10)
    binary = np.r_[np.zeros(700), np.ones(300)]
    edges = drift.bin_edges(binary)
    assert edges == [0.0, 1.0]  # ties merged: x <= 0, 0 < x <= 1, x > 1
    assert drift.shares(binary, edges) == pytest.approx([0.7, 0.3, 0.0])


def test_a_shifted_sample_is_past_the_threshold_and_a_fresh_one_is_not() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, 20_000)
    ref = drift.profile(train[:, None], rng.random(20_000), ["x"])
    assert drift.psi_of(ref, "x", rng.normal(0, 1, 5_000)) < 0.02
    assert drift.psi_of(ref, "x", rng.normal(1, 1, 5_000)) > drift.DEFAULT_THRESHOLD


def test_live_drift_counts_rows_in_bulk_and_reports_per_feature() -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(0, 1, (10_000, 2))
    ref = drift.profile(train, rng.random(10_000), ["a", "b"])
    live = drift.LiveDrift(ref, ["a", "b"], flush_every=100)
    for _ in range(1_000):
        live.observe(np.array([rng.normal(0, 1), rng.normal(3, 1)]), float(rng.random()))
    values = live.feature_psi()
    assert live.rows == 1_000
    assert values["a"] < 0.1 < drift.DEFAULT_THRESHOLD < values["b"]
    assert live.score_psi() < 0.1


def test_profile_needs_one_column_per_name() -> None:
    with pytest.raises(ValueError, match="one column per name"):
        drift.profile(np.zeros((10, 3)), np.zeros(10), ["a", "b"])


def test_the_backtest_report_flags_the_day_whose_amounts_shifted() -> None:
    import pandas as pd

    from scoring_service.batch.replay import summarise

    rng = np.random.default_rng(3)
    ref = drift.profile(rng.lognormal(3, 1, (20_000, 1)), rng.random(20_000), ["amount"])
    n = 2_000
    amounts = np.r_[rng.lognormal(3, 1, n), rng.lognormal(5, 1, n)]  # day 2: amounts ~7x larger
    payments = pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(2 * n)], "customer_id": [f"c{i % 300}" for i in range(2 * n)],
        "timestamp": pd.to_datetime(["2018-09-01 12:00"] * n + ["2018-09-02 12:00"] * n),
        "is_fraud": (rng.random(2 * n) < 0.05).astype(int), "amount": amounts,
    })
    answers = [{"risk_score": float(s), "source": "MODEL"} for s in rng.random(2 * n)]
    report = summarise(payments, answers, ref)
    days = report["drift_per_day"]
    assert days["2018-09-01"]["flagged"] == [] and days["2018-09-01"]["amount"] < 0.05
    assert days["2018-09-02"]["flagged"] == ["amount"] and days["2018-09-02"]["amount"] > 0.2
    assert summarise(payments, answers)["drift_per_day"] is None  # no profile, no drift section
