"""The entity-risk definition shared by nightly and replay (a transparent fake model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scoring_service.core import features as F
from scoring_service.core.entity_scoring import build_entries

AMOUNT = F.FEATURE_NAMES.index("amount")


class AmountModel:
    """Scores a row by its amount feature, so the row a score came from is visible."""

    def predict(self, X):
        return X[:, AMOUNT] / 1000.0

    def explain(self, X, top_k=3):
        return [[("AMOUNT_HIGH", "amount", float(x))] for x in X[:, AMOUNT]]


def _payments() -> pd.DataFrame:
    rows = []
    t0 = pd.Timestamp("2018-08-01")
    for i in range(10):  # customer c1: nine payments of 20 and one of 500 (a large payment, yesterday)
        rows.append((f"t{i}", "c1", "m1", 500.0 if i == 9 else 20.0, t0 + pd.Timedelta(hours=12 * i)))
    rows.append(("t10", "c2", "m2", 40.0, t0 + pd.Timedelta(days=2)))
    df = pd.DataFrame(rows, columns=["transaction_id", "customer_id", "terminal_id", "amount", "timestamp"])
    df["is_fraud"] = np.int8(0)
    return df


def test_entity_risk_is_the_score_of_its_typical_payment_now():
    payments = _payments()
    as_of = pd.Timestamp("2018-08-06")
    customers, terminals = build_entries(payments, as_of, AmountModel(), "v1", "g1")
    assert set(customers) == {"c1", "c2"} and set(terminals) == {"m1", "m2"}
    c1 = customers["c1"]
    # the usual amount (mean of the 30-day window), not the one large payment
    assert c1.state["avg_amount_30d"] == pytest.approx((9 * 20 + 500) / 10)
    assert c1.risk_score == pytest.approx(c1.state["avg_amount_30d"] / 1000, rel=1e-5)
    assert c1.reasons == [("AMOUNT_HIGH", "amount", pytest.approx(68.0, rel=1e-5))]
    # terminals: the window's median amount, paid by an unknown card
    median = float(payments["amount"].median())
    assert terminals["m1"].risk_score == pytest.approx(median / 1000, rel=1e-5)
    assert {e.generation for e in [*customers.values(), *terminals.values()]} == {"g1"}
    assert {e.computed_at for e in customers.values()} == {as_of.timestamp()}


def test_same_window_gives_the_same_entries():
    payments = _payments()
    one = build_entries(payments, "2018-08-06", AmountModel(), "v1", "g")
    two = build_entries(payments.sample(frac=1.0, random_state=1), "2018-08-06", AmountModel(), "v1", "g")
    assert one == two


def test_payments_after_as_of_are_ignored():
    payments = _payments()
    customers, _ = build_entries(payments, "2018-08-02 13:00", AmountModel(), "v1", "g")
    assert set(customers) == {"c1"} and customers["c1"].state["nb_tx_30d"] == 4
