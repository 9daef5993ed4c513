"""bench/backtest_report: the cold-start cohort, per-group summaries and card-testing detection, on hand-made frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.backtest_report import (
    attach_scenarios,
    choose_cohort,
    cohort_summaries,
    detection_summary,
    group_summary,
    rename_cohort,
    scenarios_by_transaction,
    scored_frame,
)
from scoring_service.batch.replay import summarise


def payments(rows: list[tuple[str, str, float, str, int]]) -> pd.DataFrame:
    """(transaction, customer, amount, timestamp, is_fraud) -> a normalised payments frame."""
    return pd.DataFrame({
        "transaction_id": [r[0] for r in rows],
        "customer_id": [r[1] for r in rows],
        "terminal_id": ["t1"] * len(rows),
        "amount": [float(r[2]) for r in rows],
        "timestamp": pd.to_datetime([r[3] for r in rows]),
        "is_fraud": np.array([r[4] for r in rows], dtype=np.int8),
    })


def answer(score: float, source: str = "CACHE", decision: str = "APPROVE") -> dict:
    return {"risk_score": score, "source": source, "decision": decision, "degraded": False, "latency_ms": 1.0,
            "client_latency_ms": 2.0}


# ------------------------------------------------------------------------------------ cohort
def test_cohort_is_seeded_share_of_distinct_cards() -> None:
    ids = [str(i) for i in range(100)] * 3
    a = choose_cohort(ids, 0.2, seed=1)
    assert len(a) == 20 and a <= set(ids)
    assert a == choose_cohort(list(reversed(ids)), 0.2, seed=1)  # order of the input does not matter
    assert a != choose_cohort(ids, 0.2, seed=2)
    assert choose_cohort(ids, 0.0, seed=1) == set()
    assert choose_cohort(ids, 1.0, seed=1) == set(ids)
    assert choose_cohort([1, 2, 3, 4], 0.5, seed=0) <= {"1", "2", "3", "4"}
    with pytest.raises(ValueError):
        choose_cohort(ids, 1.5, seed=1)


def test_rename_cohort_renames_only_the_cohort_and_keeps_the_input() -> None:
    df = payments([("a", "1", 10, "2018-08-08 01:00", 0), ("b", "2", 20, "2018-08-08 02:00", 0),
                   ("c", "1", 30, "2018-08-09 03:00", 1)])
    out = rename_cohort(df, {"1"})
    assert out["customer_id"].tolist() == ["new-1", "2", "new-1"]
    assert df["customer_id"].tolist() == ["1", "2", "1"]
    assert out.drop(columns="customer_id").equals(df.drop(columns="customer_id"))
    assert rename_cohort(df, set())["customer_id"].tolist() == ["1", "2", "1"]


# ------------------------------------------------------------------------------------ per-group summaries
def two_groups() -> tuple[pd.DataFrame, list[dict]]:
    df = payments([
        ("a", "1", 10, "2018-08-08 01:00", 1),  # cohort card 1: fraud, scored high
        ("b", "2", 10, "2018-08-08 02:00", 0),  # cohort card 2: genuine, scored low
        ("c", "3", 10, "2018-08-08 03:00", 0),  # rest card 3: genuine, scored high
        ("d", "4", 10, "2018-08-08 04:00", 1),  # rest card 4: fraud, scored low
        ("e", "4", 10, "2018-08-09 05:00", -1),  # unlabelled: left out of the metrics
        ("f", "3", 10, "2018-08-09 06:00", 0),  # an error: left out
    ])
    answers = [answer(0.9, "MODEL", "DECLINE"), answer(0.1, "CACHE"), answer(0.8), answer(0.2), answer(0.5),
               {"source": "ERROR", "error": "UNAVAILABLE"}]
    return df, answers


def test_group_summaries_split_cohort_and_rest() -> None:
    df, answers = two_groups()
    scored = scored_frame(df, answers)
    groups = cohort_summaries(scored, scored["customer_id"].isin({"1", "2"}))
    co, rest = groups["cohort"], groups["rest"]
    assert (co["requests"], co["cards"], co["labelled"], co["frauds"], co["errors"]) == (2, 2, 2, 1, 0)
    assert co["average_precision"] == pytest.approx(1.0)
    assert co["card_precision_at_100"] == pytest.approx(0.01)  # one compromised card in the top 100, one day
    assert co["card_precision_at_100_ceiling"] == pytest.approx(0.01)
    assert co["cache_hit_ratio"] == pytest.approx(0.5)
    assert co["decline_ratio"] == pytest.approx(0.5)
    assert co["sources"] == {"MODEL": 1, "CACHE": 1}
    assert (rest["requests"], rest["cards"], rest["labelled"], rest["frauds"], rest["errors"]) == (4, 2, 2, 1, 1)
    assert rest["average_precision"] == pytest.approx(0.5)  # the fraud ranked below the genuine payment
    assert set(rest["card_precision_at_100_per_day"]) == {"2018-08-08"}


def test_group_summary_of_everything_matches_summarise() -> None:
    df, answers = two_groups()
    whole = group_summary(scored_frame(df, answers))
    ref = summarise(df, answers)
    for key in ("requests", "errors", "labelled", "frauds", "average_precision", "card_precision_at_100", "cache_hit_ratio",
                "card_precision_at_100_per_day"):
        assert whole[key] == pytest.approx(ref[key]), key


def test_group_without_fraud_has_nan_average_precision() -> None:
    df = payments([("a", "1", 10, "2018-08-08 01:00", 0)])
    s = group_summary(scored_frame(df, [answer(0.3)]))
    assert math.isnan(s["average_precision"]) and s["card_precision_at_100"] == 0.0


def test_scored_frame_needs_one_answer_per_payment() -> None:
    df, answers = two_groups()
    with pytest.raises(ValueError):
        scored_frame(df, answers[:-1])
    with pytest.raises(ValueError):
        cohort_summaries(scored_frame(df, answers), [True, False])


# ------------------------------------------------------------------------------------ card testing
def test_scenarios_are_joined_back_by_transaction_id() -> None:
    assert scenarios_by_transaction(pd.DataFrame({"TRANSACTION_ID": [1, 2]})) is None
    raw = pd.DataFrame({"TRANSACTION_ID": [10, 11, 12], "TX_FRAUD_SCENARIO": np.array([0, 4, 4], dtype=np.int8)})
    sc = scenarios_by_transaction(raw)
    assert sc is not None
    scored = pd.DataFrame({"transaction_id": ["12", "99", "10", "11"]})
    assert attach_scenarios(scored, sc).tolist() == [4, 0, 0, 4]


def card_testing_frame() -> tuple[pd.DataFrame, list[dict], list[int]]:
    rows, answers, scenario = [], [], []

    def add(tx: str, card: str, amount: float, at: str, sc: int, decision: str = "APPROVE") -> None:
        rows.append((tx, card, amount, at, 1 if sc else 0))
        answers.append(answer(0.5, "CACHE", decision))
        scenario.append(sc)

    # card A: declined on its 3rd small payment -> before the first large one
    add("a0", "A", 30, "2018-08-08 09:00", 0, "DECLINE")  # an earlier decline, before the attack: not counted
    add("a1", "A", 1, "2018-08-08 10:00", 4)
    add("a2", "A", 2, "2018-08-08 10:01", 4)
    add("a3", "A", 3, "2018-08-08 10:02", 4, "DECLINE")
    add("a4", "A", 120, "2018-08-08 10:20", 4, "DECLINE")
    # card B: declined only on its first large payment -> at, not before
    add("b1", "B", 1, "2018-08-08 11:00", 4)
    add("b2", "B", 4, "2018-08-08 11:02", 4)
    add("b3", "B", 80, "2018-08-08 11:30", 4, "DECLINE")
    add("b4", "B", 150, "2018-08-08 11:40", 4)
    # card C: never declined (an unrelated card's decline in between does not count)
    add("x1", "X", 500, "2018-08-08 12:01", 1, "DECLINE")
    add("c1", "C", 2, "2018-08-08 12:00", 4)
    add("c2", "C", 60, "2018-08-08 12:30", 4)
    add("c3", "C", 70, "2018-08-08 12:40", 4, "DECLINE")  # after the first large one
    # card D: the burst at the end of the replay, no large payment in it, declined in the burst
    add("d1", "D", 1, "2018-08-08 23:55", 4)
    add("d2", "D", 2, "2018-08-08 23:58", 4, "DECLINE")
    return payments(rows), answers, scenario


def test_detection_rates_before_and_at_the_first_large_payment() -> None:
    df, answers, scenario = card_testing_frame()
    d = detection_summary(scored_frame(df, answers), scenario)
    assert d["cards"] == 4 and d["cards_with_large_in_replay"] == 3
    assert d["declined_before_large"] == pytest.approx(2 / 4)  # A, D
    assert d["declined_at_or_before_large"] == pytest.approx(3 / 4)  # A, B, D
    assert d["card_testing_payments"] == 13 and d["large_payments"] == 5
    assert d["large_declined_share"] == pytest.approx(3 / 5)  # a4, b3, c3
    assert d["small_declined_share"] == pytest.approx(2 / 8)  # a3, d2


def test_detection_groups_by_the_given_cards_not_the_served_ids() -> None:
    df, answers, scenario = card_testing_frame()
    renamed = rename_cohort(df, {"B"})
    d = detection_summary(scored_frame(renamed, answers), scenario, card=df["customer_id"])
    assert d["cards"] == 4 and d["declined_at_or_before_large"] == pytest.approx(3 / 4)


def test_detection_without_card_testing_payments() -> None:
    df, answers = two_groups()
    d = detection_summary(scored_frame(df, answers), np.zeros(len(df), dtype=np.int8))
    assert d["cards"] == 0 and math.isnan(d["declined_before_large"])
    with pytest.raises(ValueError):
        detection_summary(scored_frame(df, answers), [0, 4])
