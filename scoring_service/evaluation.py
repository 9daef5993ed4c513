"""Metrics and the handbook's evaluation protocol (chapter 3, "Baseline fraud detection system").

* ``train_test_split_handbook``: train on ``[train_start, train_start + train_days)``, skip
  ``delay_days``, test on the next ``test_days`` days. Cards known to be compromised are left out
  of each test day D: those with a fraud in the training week, plus those with a fraud on a day
  from the training start up to D - delay - 1 (the labels that have arrived by D).
* ``card_precision_at_k``: per test day in order, leave out cards caught on earlier test days
  (in that day's top k and really compromised); a card's score is the max of its payments' scores
  that day; take the k best cards; count those with a fraud that day; divide by k; average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score


def auc_roc(y_true, y_score) -> float:
    return float(roc_auc_score(np.asarray(y_true), np.asarray(y_score)))


def average_precision(y_true, y_score) -> float:
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
    detected: set = set()
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


def train_test_split_handbook(
    payments: pd.DataFrame,
    train_start: str | pd.Timestamp,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, test) over ``payments`` following the handbook protocol."""
    ts = pd.to_datetime(payments["timestamp"]).to_numpy()
    day_np = ts.astype("datetime64[D]")
    t0 = np.datetime64(pd.Timestamp(train_start).normalize().date(), "D")
    train = (day_np >= t0) & (day_np < t0 + np.timedelta64(train_days, "D"))
    fraud = (payments["is_fraud"].to_numpy() == 1) if "is_fraud" in payments.columns else np.zeros(len(payments), bool)
    cust = pd.Series(payments["customer_id"].to_numpy())
    test = np.zeros(len(payments), dtype=bool)
    known = set(cust[train & fraud])
    test_start = t0 + np.timedelta64(train_days + delay_days, "D")
    for i in range(test_days):
        d = test_start + np.timedelta64(i, "D")
        # labels of day d - delay - 1 arrive by d (the training week's are already in ``known``)
        newly = d - np.timedelta64(delay_days + 1, "D")
        if newly >= t0 + np.timedelta64(train_days, "D"):
            known |= set(cust[(day_np == newly) & fraud])
        m = np.flatnonzero(day_np == d)
        test[m] = ~cust.iloc[m].isin(known).to_numpy()
    return train, test


def evaluate_scores(test_payments: pd.DataFrame, scores: np.ndarray, k: int = 100) -> dict[str, float]:
    """The three handbook metrics of ``scores`` over the (already filtered) test payments."""
    y = (test_payments["is_fraud"].to_numpy() == 1).astype(int)
    df = test_payments[["customer_id", "timestamp", "is_fraud"]].copy()
    df["score"] = np.asarray(scores, dtype=np.float64)
    return {
        "auc_roc": auc_roc(y, scores),
        "average_precision": average_precision(y, scores),
        f"card_precision_at_{k}": card_precision_at_k(df, k=k),
    }


def handbook_xgboost_baseline(payments: pd.DataFrame, features: pd.DataFrame, train_start: str = "2018-07-25") -> dict[str, float]:
    """Reproduce the handbook's XGBoost row (0.862 / 0.639 / 0.273) with its 15 features.

    ``features``: ``payments_features(payments)`` (the first 15 columns are the handbook's).
    """
    import xgboost as xgb

    from .features import FEATURE_NAMES

    cols = FEATURE_NAMES[:15]
    train, test = train_test_split_handbook(payments, train_start)
    Xtr = features.loc[train, cols].to_numpy(np.float64)
    Xte = features.loc[test, cols].to_numpy(np.float64)
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
    sd[sd == 0] = 1.0
    clf = xgb.XGBClassifier(tree_method="exact", base_score=0.5, random_state=0, n_jobs=1)
    clf.fit((Xtr - mu) / sd, payments.loc[train, "is_fraud"].to_numpy() == 1)
    scores = clf.predict_proba((Xte - mu) / sd)[:, 1]
    return evaluate_scores(payments.loc[test], scores)
