"""The fraud metrics the handbook reports, shared by training, the replay report and the backtest.

* ``auc_roc`` and ``average_precision`` over payments.
* ``card_precision_at_k``: per test day in order, leave out cards caught on earlier test days
  (in that day's top k and really compromised); a card's score is the max of its payments' scores
  that day; take the k best cards; count those with a fraud that day; divide by k; average.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score


def auc_roc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    return float(roc_auc_score(np.asarray(y_true), np.asarray(y_score)))


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float:
    return float(average_precision_score(np.asarray(y_true), np.asarray(y_score)))


def _days(ts: pd.Series) -> pd.Series:
    return pd.to_datetime(ts).dt.normalize()


def card_precision_per_day(payments_with_scores: pd.DataFrame, k: int = 100, score_col: str = "score") -> dict[str, float]:
    """Card Precision@k of each day, as the handbook computes it.

    For each day in order: leave out the cards already caught on an earlier day (in that day's top
    k and really compromised); a card's score is the max of its payments' scores that day; take
    the k cards with the highest scores; count those with a fraudulent payment that day; divide by k.
    ``payments_with_scores``: normalised payments (customer_id, timestamp, is_fraud) plus a
    ``score`` column (name configurable).
    """
    df = payments_with_scores[["customer_id", "is_fraud", score_col]].copy()
    df["day"] = _days(payments_with_scores["timestamp"])
    detected: set[Any] = set()
    out: dict[str, float] = {}
    for day, df_day in df.groupby("day", sort=True):
        df_day = df_day[~df_day["customer_id"].isin(detected)]
        cards = (
            df_day.groupby("customer_id")[[score_col, "is_fraud"]].max()
            .sort_values(by=score_col, ascending=False)
            .reset_index(drop=False)
        )
        top = cards.head(k)
        caught = list(top.loc[top["is_fraud"] == 1, "customer_id"])
        out[str(pd.Timestamp(day).date())] = len(caught) / k
        detected.update(caught)
    return out


def card_precision_at_k(payments_with_scores: pd.DataFrame, k: int = 100, score_col: str = "score") -> float:
    """Card Precision@k as the handbook reports it: the mean of :func:`card_precision_per_day`."""
    per_day = card_precision_per_day(payments_with_scores, k, score_col)
    return float(np.mean(list(per_day.values()))) if per_day else float("nan")
