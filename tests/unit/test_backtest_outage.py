"""bench/backtest's Redis outage: the window, each day's parts, the runs planned, and what the answers decided."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.backtest import REDIS_UP, planned_runs
from bench.backtest_report import decision_counts, in_window, parse_window, scored_frame, split_day

DAY = pd.Timestamp("2018-08-08")


def payments(times: list[str], frauds: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "transaction_id": [str(i) for i in range(len(times))],
        "customer_id": [f"c{i}" for i in range(len(times))],
        "terminal_id": ["t1"] * len(times),
        "amount": [10.0] * len(times),
        "timestamp": pd.to_datetime(times),
        "is_fraud": np.array(frauds, dtype=np.int8),
    })


def test_parse_window() -> None:
    assert parse_window("12:00-13:30") == (pd.Timedelta(hours=12), pd.Timedelta(hours=13, minutes=30))
    assert parse_window("00:00-24:00") == (pd.Timedelta(0), pd.Timedelta(days=1))
    for bad in ("12:00", "13:00-12:00", "12:00-12:00", "noon-13:00", "12:00-25:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_split_day_and_in_window_agree_on_the_edges() -> None:
    df = payments(["2018-08-08 11:59:59", "2018-08-08 12:00:00", "2018-08-08 12:59:59", "2018-08-08 13:00:00",
                   "2018-08-08 23:00:00"], [0, 1, 0, 0, 1])
    window = parse_window("12:00-13:00")
    before, during, after = split_day(df, DAY, window)
    assert before["transaction_id"].tolist() == ["0"]
    assert during["transaction_id"].tolist() == ["1", "2"]
    assert after["transaction_id"].tolist() == ["3", "4"]
    assert pd.concat([before, during, after]).equals(df)  # time order kept: the answers line up with the rows
    assert in_window(df["timestamp"], window).tolist() == [False, True, True, False, False]
    other_day = payments(["2018-08-09 12:30:00", "2018-08-09 14:00:00"], [0, 0])
    assert in_window(other_day["timestamp"], window).tolist() == [True, False]  # any day


def test_planned_runs() -> None:
    assert planned_runs("cache-first", [None], False) == [("cache-first", "floor default", None, False)]  # unchanged
    assert [r[0] for r in planned_runs("cache-first", ["REVIEW", "APPROVE"], False)] == [
        "cache-first floor REVIEW", "cache-first floor APPROVE"]
    runs = planned_runs("cache-first", ["REVIEW", "APPROVE"], True)
    assert runs == [("cache-first outage floor REVIEW", "outage floor REVIEW", "REVIEW", True),
                    ("cache-first outage floor APPROVE", "outage floor APPROVE", "APPROVE", True),
                    ("cache-first", REDIS_UP, None, False)]  # the normal run last, under the mode's own key


def test_decision_counts() -> None:
    df = payments(["2018-08-08 12:00"] * 6, [1, 1, 1, 0, 0, 0])
    answers = [
        {"source": "MODEL", "decision": "APPROVE", "degraded": True, "reasons": ("AMOUNT_HIGH",)},  # fraud passed
        {"source": "MODEL", "decision": "REVIEW", "degraded": True,
         "reasons": ("ENTITY_STATE_UNAVAILABLE", "AMOUNT_HIGH")},  # fraud stopped
        {"source": "ERROR", "error": "DEADLINE_EXCEEDED"},  # fraud, no answer: neither
        {"source": "CACHE", "decision": "APPROVE", "degraded": False, "reasons": ()},
        {"source": "MODEL", "decision": "REVIEW", "degraded": True, "reasons": ("ENTITY_STATE_UNAVAILABLE",)},
        {"source": "FALLBACK", "decision": "DECLINE", "degraded": True, "reasons": ("MODEL_UNAVAILABLE",)},
    ]
    c = decision_counts(scored_frame(df, answers))
    assert {k: c[k] for k in ("payments", "errors", "frauds", "frauds_passed", "frauds_stopped", "genuine",
                              "genuine_stopped", "genuine_declined", "degraded")} == {
        "payments": 6, "errors": 1, "frauds": 3, "frauds_passed": 1, "frauds_stopped": 1, "genuine": 3,
        "genuine_stopped": 2, "genuine_declined": 1, "degraded": 4}
    assert c["sources"] == {"MODEL": 3, "ERROR": 1, "CACHE": 1, "FALLBACK": 1}
    assert c["decisions"] == {"APPROVE": 2, "REVIEW": 2, "DECLINE": 1}
    assert c["reasons"] == {"ENTITY_STATE_UNAVAILABLE": 2, "AMOUNT_HIGH": 2, "MODEL_UNAVAILABLE": 1}
    assert decision_counts(scored_frame(df.iloc[:0], []))["payments"] == 0
