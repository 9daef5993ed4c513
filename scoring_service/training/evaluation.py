"""The handbook's evaluation protocol (chapter 3, "Baseline fraud detection system").

* ``train_test_split_handbook``: train on ``[train_start, train_start + train_days)``, skip
  ``delay_days``, test on the next ``test_days`` days. Cards known to be compromised are left out
  of each test day D: those with a fraud in the training week, plus those with a fraud on a day
  from the training start up to D - delay - 1 (the labels that have arrived by D).
* ``evaluate_scores``: the three handbook metrics (``scoring_service.core.metrics``) of a test set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scoring_service.core.features import FEATURE_NAMES
from scoring_service.core.metrics import auc_roc, average_precision, card_precision_at_k


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


def handbook_xgboost_baseline(
    payments: pd.DataFrame, features: pd.DataFrame, train_start: str = "2018-07-25"
) -> dict[str, float]:
    """Reproduce the handbook's XGBoost row (0.862 / 0.639 / 0.273) with its 15 features.

    ``features``: ``payments_features(payments)`` (the first 15 columns are the handbook's).
    """
    import xgboost as xgb

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
