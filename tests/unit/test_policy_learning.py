"""learn_policy learns each rule on the payments the rule fires on online (Policy.payment_floor)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scoring_service.core import features as F
from scoring_service.core.policy import Policy
from scoring_service.training.decision_rules import learn_policy
from scoring_service.training.simulator import simulate

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
    (customer states just before each payment, velocity from the card's previous payments)."""
    fired: dict[str, list[int]] = {k: [] for k in ("high_amount", "ratio_decline", "ratio_review", "velocity_decline",
                                                    "velocity_review")}
    for i, row in enumerate(payments.itertuples(index=False)):
        earlier = payments.iloc[:i]
        mine = earlier[earlier["customer_id"] == row.customer_id]
        cs, _ = F.entity_states(mine, row.timestamp)
        velocity = F.velocity_of([F.epoch_seconds(t) for t in mine["timestamp"]], F.epoch_seconds(row.timestamp))
        _, rule = policy.payment_floor(row.amount, cs.get(row.customer_id), velocity)
        if rule is None:
            continue
        if rule[0] == "AMOUNT_ABOVE_HIGH_LIMIT":
            fired["high_amount"].append(row.is_fraud)
        elif rule[0] == "CARD_VELOCITY_1H_HIGH":
            fired["velocity_decline" if rule[2] >= policy.velocity_1h_decline else "velocity_review"].append(row.is_fraud)
        elif rule[2] >= policy.amount_ratio_decline:
            fired["ratio_decline"].append(row.is_fraud)
        else:
            fired["ratio_review"].append(row.is_fraud)
    return {k: float(np.mean(v)) if v else 0.0 for k, v in fired.items()} | {f"n_{k}": float(len(v)) for k, v in fired.items()}


LEARNT_RATE_OF = {"high_amount": "high_amount_fraud_rate", "ratio_decline": "amount_ratio_decline_fraud_rate",
                  "ratio_review": "amount_ratio_review_fraud_rate", "velocity_decline": "velocity_1h_decline_fraud_rate",
                  "velocity_review": "velocity_1h_review_fraud_rate"}


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
    assert learnt["velocity_1h_decline_fraud_rate"] == online["velocity_decline"] == 0.0


def test_without_bursts_the_velocity_rules_are_off():
    payments = _payments()  # one payment a day per customer
    learnt = learn_policy(payments, F.payments_features(payments))
    assert learnt["velocity_1h_decline"] == learnt["velocity_1h_review"] == float("inf")
    assert learnt["velocity_1h_decline_fraud_rate"] == learnt["velocity_1h_review_fraud_rate"] == 0.0
    assert learnt["typical_amount"] == pytest.approx(float(payments["amount"].median())) == 10.0


def _bursts(start: pd.Timestamp) -> list[tuple[str, str, float, pd.Timestamp, int]]:
    """Velocity-only data, one payment a minute:

    * 6 tested cards: 14 payments in 14 minutes, all fraud (1 per hour count 1..14 each);
    * 40 genuine cards: 3 payments (counts 1..3); 4 busy genuine cards: 8 payments (counts 1..8).

    Payments with count >= N: frauds 6 (15 - N), genuine 40 max(0, 4 - N) + 4 max(0, 9 - N):
    N = 6 is the lowest with a rate >= 0.8 (54 / 66; N = 5: 60 / 76); below it, 4 <= count < 6 is
    the lowest band with a rate >= 0.3 (12 / 20; 3 <= count < 6: 18 / 70).
    """
    rows = []
    for kind, n_cards, n_payments, fraud in (("t", 6, 14, 1), ("g", 40, 3, 0), ("b", 4, 8, 0)):
        for c in range(n_cards):
            for k in range(n_payments):
                rows.append((f"{kind}{c}", f"term-{kind}{c}-{k}", 10.0, start + pd.Timedelta(minutes=c + k), fraud))
    return rows


def _frame(rows: list[tuple[str, str, float, pd.Timestamp, int]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["customer_id", "terminal_id", "amount", "timestamp", "is_fraud"])
    df["transaction_id"] = [str(i) for i in range(len(df))]
    df["is_fraud"] = df["is_fraud"].astype("int8")
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def test_velocity_thresholds_are_the_lowest_counts_with_the_rates():
    payments = _frame(_bursts(T0 + pd.Timedelta(days=1)))
    # min_history out of reach: no ratio rule, the velocity rules alone
    learnt = learn_policy(payments, F.payments_features(payments), min_history=1e9)
    assert learnt["velocity_1h_decline"] == 6.0
    assert learnt["velocity_1h_decline_fraud_rate"] == pytest.approx(54 / 66)
    assert learnt["velocity_1h_review"] == 4.0
    assert learnt["velocity_1h_review_fraud_rate"] == pytest.approx(12 / 20)
    policy = Policy.of({"review": 0.3, "decline": 0.7}, learnt)
    online = _rates_where_rules_fire(payments, policy)
    assert online["n_velocity_decline"] == 66 and online["n_velocity_review"] == 20
    assert learnt["velocity_1h_decline_fraud_rate"] == pytest.approx(online["velocity_decline"])
    assert learnt["velocity_1h_review_fraud_rate"] == pytest.approx(online["velocity_review"])


def test_velocity_rules_need_five_payments():
    def one_tested_card(n_payments: int) -> dict[str, float]:
        rows = [r for r in _bursts(T0) if r[0][0] in "gb"]
        rows += [("t0", f"tt-{k}", 10.0, T0 + pd.Timedelta(minutes=k), 1) for k in range(n_payments)]
        payments = _frame(rows)
        return learn_policy(payments, F.payments_features(payments), min_history=1e9)

    # 13 payments: counts 9..13 are 5 frauds and no genuine payment (the busy cards reach 8)
    assert one_tested_card(13)["velocity_1h_decline"] == 9.0
    # 12: counts 9..12 are only 4 payments; 8..12: 5 frauds of 9: no decline rule
    learnt = one_tested_card(12)
    assert learnt["velocity_1h_decline"] == float("inf") and learnt["velocity_1h_decline_fraud_rate"] == 0.0
    # the review band is then open-ended: counts >= 4 hold 9 frauds and 20 genuine (>= 0.3); >= 3: 10 of 74
    assert learnt["velocity_1h_review"] == 4.0
    assert learnt["velocity_1h_review_fraud_rate"] == pytest.approx(9 / 29)


def _all_rules_payments() -> pd.DataFrame:
    """Every rule fires, and each takes payments a later rule would also fire on.

    Established customers (10 a day on days 1-4, history 3 from their 4th payment) then pay on day 5:
    * 110 quiet ones 10 (ratio 1, genuine): the genuine ratios' 99.5th percentile is then 3;
    * 10 pay 30 (3x: 6 frauds): the review ratio's band; 2 of them (1 fraud) first pay 10 three
      times in the half hour before: their 30 is the velocity review's (count 4), not the ratio's;
    * 10 pay 80 (8x: 9 frauds): the decline ratio; 2 of them (frauds) also pay three times before:
      count 4, the ratio decline comes first;
    * 10 pay 500 (frauds): the high amount;
    * the tested cards of :func:`_bursts` (counts 1..14, frauds) then pay 80 twice (counts 15, 16,
      ratio ~25): the velocity decline comes first;
    * 10 new customers (one payment before) pay 100, genuine: no ratio rule (history), and the
      high amount stays 500.
    """
    rows = _bursts(T0 + pd.Timedelta(days=5, hours=3))
    day5 = T0 + pd.Timedelta(days=5, hours=12)
    customers = [(f"q{i}", 10.0, 0, False) for i in range(110)]
    customers += [(f"r{i}", 30.0, int(i < 6), i in (0, 9)) for i in range(10)]
    customers += [(f"d{i}", 80.0, int(i < 9), i in (0, 1)) for i in range(10)]
    customers += [(f"h{i}", 500.0, 1, False) for i in range(10)]
    customers += [(f"t{c}", 80.0, 1, False) for c in range(6)]
    customers += [(f"n{i}", 100.0, 0, False) for i in range(10)]
    for cid, amount, fraud, quick in customers:
        first_day = 4 if cid.startswith("n") else 1
        rows += [(cid, f"{cid}-{d}", 10.0, T0 + pd.Timedelta(days=d, hours=9), 0) for d in range(first_day, 5)]
        if cid.startswith("t"):  # after the burst (day 5, 03:00 + c + 0..13 minutes)
            rows += [(cid, f"{cid}-x{k}", amount, T0 + pd.Timedelta(days=5, hours=3, minutes=30 + k), 1) for k in range(2)]
            continue
        if quick:
            rows += [(cid, f"{cid}-q{k}", 10.0, day5 - pd.Timedelta(minutes=30 - 10 * k), 0) for k in range(3)]
        rows.append((cid, f"{cid}-last", amount, day5, fraud))
    return _frame(rows)


def test_all_rules_together_rates_where_each_fires_in_the_online_order():
    payments = _all_rules_payments()
    learnt = learn_policy(payments, F.payments_features(payments))
    assert learnt["high_amount"] == 500.0
    # counts >= 5: the bursts' 60 and the tested cards' 12 80s, frauds, and the busy cards' 16 (72 / 88);
    # >= 4 adds 6 + 3 frauds and 4 + 1 genuine (81 / 102 < 0.8)
    assert (learnt["velocity_1h_review"], learnt["velocity_1h_decline"]) == (4.0, 5.0)
    assert learnt["amount_ratio_review"] == pytest.approx(3.0)
    assert 3.0 < learnt["amount_ratio_decline"] <= 8.0
    policy = Policy.of({"review": 0.3, "decline": 0.7}, learnt)
    online = _rates_where_rules_fire(payments, policy)
    for rule, key in LEARNT_RATE_OF.items():
        assert learnt[key] == pytest.approx(online[rule]), rule
    assert online["n_high_amount"] == 10 and online["high_amount"] == 1.0
    assert online["n_velocity_decline"] == 88 and online["velocity_decline"] == pytest.approx(72 / 88)
    # the 80s, 2 of them with count 4: the ratio decline before the velocity review
    assert online["n_ratio_decline"] == 10 and online["ratio_decline"] == pytest.approx(0.9)
    # count 4: the bursts' 6 frauds, the busy cards' 4, and the two 30s paid after three quick ones (1 fraud)
    assert online["n_velocity_review"] == 12 and online["velocity_review"] == pytest.approx(7 / 12)
    # the other 8 30s (5 frauds): the review ratio's
    assert online["n_ratio_review"] == 8 and online["ratio_review"] == pytest.approx(5 / 8)


def test_card_testing_in_simulated_payments_is_learnt():
    sim = simulate(2000, 4000, "2018-04-01", 14, seed=7, card_testing_per_day=1e-3)
    payments = F.normalise_handbook(sim)
    learnt = learn_policy(payments, F.payments_features(payments))
    assert 3.0 <= learnt["velocity_1h_decline"] <= 12.0
    assert learnt["velocity_1h_decline_fraud_rate"] >= 0.8
    assert learnt["velocity_1h_review"] <= learnt["velocity_1h_decline"]
    assert learnt["typical_amount"] == pytest.approx(float(payments["amount"].median()))
    # the same customers without card testing: no velocity rule
    quiet = F.normalise_handbook(simulate(2000, 4000, "2018-04-01", 14, seed=7, card_testing_per_day=0))
    learnt = learn_policy(quiet, F.payments_features(quiet))
    assert learnt["velocity_1h_decline"] == learnt["velocity_1h_review"] == float("inf")
