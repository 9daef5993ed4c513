"""learn_policy learns each rule on the payments the rule fires on online (Policy.payment_floor)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scoring_service.core import features as F
from scoring_service.core.policy import Policy
from scoring_service.training.decision_rules import learn_policy

T0 = pd.Timestamp("2018-07-01")


def _payments() -> pd.DataFrame:
    """Customers paying 10 a day, then a payment of 80 (8x their usual) or 500 on day 5.

    * 20 established customers (4 payments before): 16 of their 80s are frauds;
    * 30 new customers (1 payment before): their 80s are genuine, but too little history for the
      ratio rules (Policy.min_history = 3) - they must not dilute the ratio rules' rates;
    * 10 established customers pay 500, frauds: the high-amount rule's, not the ratio rules'.
    """
    rows = []

    def customer(cid: str, n_before: int, last_amount: float, fraud: int) -> None:
        for d in range(5 - n_before, 5):
            rows.append((cid, f"t{cid}-{d}", 10.0, T0 + pd.Timedelta(days=d, hours=10), 0))
        rows.append((cid, f"t{cid}-last", last_amount, T0 + pd.Timedelta(days=5, hours=12), fraud))

    for i in range(20):
        customer(f"e{i}", 4, 80.0, int(i < 16))
    for i in range(30):
        customer(f"n{i}", 1, 80.0, 0)
    for i in range(10):
        customer(f"h{i}", 4, 500.0, 1)
    df = pd.DataFrame(rows, columns=["customer_id", "terminal_id", "amount", "timestamp", "is_fraud"])
    df["transaction_id"] = [str(i) for i in range(len(df))]
    df["is_fraud"] = df["is_fraud"].astype("int8")
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _rates_where_rules_fire(payments: pd.DataFrame, policy: Policy) -> dict[str, float]:
    """Each rule's fraud rate over the payments it fires on, through the online policy itself
    (customer states just before each payment)."""
    fired: dict[str, list[int]] = {"high_amount": [], "ratio_decline": [], "ratio_review": []}
    for i, row in enumerate(payments.itertuples(index=False)):
        earlier = payments.iloc[:i]
        cs, _ = F.entity_states(earlier[earlier["customer_id"] == row.customer_id], row.timestamp)
        _, rule = policy.payment_floor(row.amount, cs.get(row.customer_id))
        if rule is None:
            continue
        if rule[0] == "AMOUNT_ABOVE_HIGH_LIMIT":
            fired["high_amount"].append(row.is_fraud)
        elif rule[2] >= policy.amount_ratio_decline:
            fired["ratio_decline"].append(row.is_fraud)
        else:
            fired["ratio_review"].append(row.is_fraud)
    return {k: float(np.mean(v)) if v else 0.0 for k, v in fired.items()}


def test_ratio_rules_are_learnt_on_customers_with_enough_history():
    payments = _payments()
    learnt = learn_policy(payments, F.payments_features(payments))
    policy = Policy.of({"review": 0.3, "decline": 0.7}, learnt)
    assert learnt["min_history"] == policy.min_history == 3.0
    assert learnt["high_amount"] == 500.0
    # among established customers below the high amount, 16 of 20 payments at 8x are frauds
    assert learnt["amount_ratio_decline"] == pytest.approx(8.0)
    assert learnt["amount_ratio_decline_fraud_rate"] == pytest.approx(0.8)
    # and the rates are those of the payments each rule fires on
    online = _rates_where_rules_fire(payments, policy)
    assert learnt["high_amount_fraud_rate"] == pytest.approx(online["high_amount"]) == 1.0
    assert learnt["amount_ratio_decline_fraud_rate"] == pytest.approx(online["ratio_decline"])
    assert learnt["amount_ratio_review_fraud_rate"] == pytest.approx(online["ratio_review"])


def test_min_history_is_a_parameter():
    payments = _payments()
    learnt = learn_policy(payments, F.payments_features(payments), min_history=1.0)
    # the new customers' genuine 80s now count: 16 frauds among 50 payments at 8x
    assert learnt["min_history"] == 1.0
    policy = Policy.of({"review": 0.3, "decline": 0.7}, learnt)
    online = _rates_where_rules_fire(payments, policy)
    assert learnt["amount_ratio_decline_fraud_rate"] == pytest.approx(online["ratio_decline"])
    assert learnt["amount_ratio_review_fraud_rate"] == pytest.approx(online["ratio_review"])
