"""Training of the fraud GBDT (XGBoost or LightGBM) on normalised payments.

Protocol (the handbook's): features are computed on the whole payments file first, the model is
trained on one week, ``delay_days`` are skipped, the following week is the test week (known
compromised cards left out, see ``evaluation.train_test_split_handbook``).

Thresholds and the transaction-level policy: ``scoring_service.training.decision_rules``.

Model choice: see ``docs/model.md`` (validation weeks, never the test week).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.adapters.files.payments_file import read_payments_file
from scoring_service.core import drift
from scoring_service.core.features import (
    FEATURE_NAMES,
    LABEL_DELAY_DAYS,
    payments_features,
    payments_features_cold_customer,
)
from scoring_service.training import evaluation as ev
from scoring_service.training.decision_rules import choose_thresholds, learn_policy

SEED = 0
# share of the training payments added a second time with the features of an unseen customer
# (the online path meets new cards; without them an unseen card paying 500 scored only 0.49)
COLD_START_FRACTION = 0.1

XGB_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    # "hist" with the default 256 bins cannot split exactly at the sharp amount > 220 fraud
    # threshold (no bin edge falls on it); max_bin=4096 can, as tree_method="exact" would.
    "max_bin": 4096,
    "eta": 0.05,
    "max_depth": 4,
    "min_child_weight": 1,
    "subsample": 1.0,
    "colsample_bytree": 1.0,
    "eval_metric": "logloss",
    "seed": SEED,
    "nthread": 2,
}
XGB_ROUNDS = 300

LGB_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": 4,
    "min_data_in_leaf": 20,
    "max_bin": 4095,
    "feature_fraction": 1.0,
    "bagging_fraction": 1.0,
    "seed": SEED,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 2,
    "verbosity": -1,
}
LGB_ROUNDS = 300


@dataclass
class TrainResult:
    artifact_path: Path
    framework: str  # "xgboost" | "lightgbm"
    feature_names: list[str]
    thresholds: dict[str, float]  # {"review": p, "decline": p}
    policy: dict[str, float]
    metrics: dict[str, float]
    params: dict[str, Any]
    train_window: tuple[str, str]
    test_window: tuple[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["artifact_path"] = str(self.artifact_path)
        return json.dumps(d, indent=2, default=float)


# ----------------------------------------------------------------------------------------------
Booster = Any  # xgboost.Booster | lightgbm.Booster


def _fit(
    framework: str, X: np.ndarray, y: np.ndarray, params: dict[str, Any] | None = None, rounds: int | None = None
) -> tuple[Booster, dict[str, Any]]:
    if framework == "xgboost":
        import xgboost as xgb

        p = {**XGB_PARAMS, **(params or {})}
        return xgb.train(p, xgb.DMatrix(X, label=y, feature_names=FEATURE_NAMES), rounds or XGB_ROUNDS), p
    if framework == "lightgbm":
        import lightgbm as lgb

        p = {**LGB_PARAMS, **(params or {})}
        data = lgb.Dataset(X, label=y, feature_name=FEATURE_NAMES, free_raw_data=True)
        return lgb.train(p, data, rounds or LGB_ROUNDS), p
    raise ValueError(f"unknown framework {framework!r} (xgboost | lightgbm)")


def _augment_cold(
    payments: pd.DataFrame, mask: np.ndarray, X: np.ndarray, y: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Training rows plus a seeded sample of them recomputed as unseen customers."""
    if fraction <= 0 or not mask.any():
        return X[mask], y[mask]
    idx = np.flatnonzero(mask)
    pick = idx[np.random.default_rng(SEED).random(len(idx)) < fraction]
    cold = payments_features_cold_customer(payments).to_numpy(np.float32)[pick]
    return np.vstack([X[mask], cold]), np.r_[y[mask], y[pick]]


def _predict(framework: str, booster: Booster, X: np.ndarray) -> np.ndarray:
    if framework == "xgboost":
        return np.asarray(booster.inplace_predict(X), dtype=np.float64)
    return np.asarray(booster.predict(X), dtype=np.float64)


def _save(framework: str, booster: Booster, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if framework == "xgboost":
        path = out_dir / "model.ubj"
        booster.save_model(str(path))
    else:
        path = out_dir / "model.txt"
        booster.save_model(str(path))
    return path


def _oof_scores(
    framework: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, params: dict[str, Any] | None, rounds: int | None,
    n_folds: int = 4,
) -> np.ndarray:
    """Out-of-fold scores, folds by card (a card's payments stay together), seeded."""
    params = {k: v for k, v in (params or {}).items() if k != "cold_start_fraction"}
    uniq, inv = np.unique(groups, return_inverse=True)
    fold_of_card = np.random.default_rng(SEED).integers(0, n_folds, len(uniq))
    fold = fold_of_card[inv]
    oof = np.zeros(len(y))
    for f in range(n_folds):
        m = fold == f
        if m.all() or not m.any() or y[~m].min() == y[~m].max():
            oof[m] = y[~m].mean() if (~m).any() else 0.0
            continue
        b, _ = _fit(framework, X[~m], y[~m], params, rounds)
        oof[m] = _predict(framework, b, X[m])
    return oof


def _finish(
    framework: str, booster: Booster, params: dict[str, Any], out_dir: str | Path, X_tr: np.ndarray, y_tr: np.ndarray,
    groups_tr: np.ndarray, pay_tr: pd.DataFrame, feat_tr: pd.DataFrame, rounds: int | None, metrics: dict[str, float],
    train_window: tuple[str, str], test_window: tuple[str, str], extra: dict[str, Any],
) -> TrainResult:
    out_dir = Path(out_dir)
    path = _save(framework, booster, out_dir)
    oof = _oof_scores(framework, X_tr, y_tr, groups_tr, params, rounds)
    thresholds = choose_thresholds(y_tr, oof)
    policy = learn_policy(pay_tr, feat_tr)
    extra = {**extra, "drift_profile": drift.profile(X_tr, oof, FEATURE_NAMES)}  # core/drift.py: PSI reference
    res = TrainResult(
        artifact_path=path, framework=framework, feature_names=list(FEATURE_NAMES), thresholds=thresholds,
        policy=policy, metrics=metrics, params=params, train_window=train_window, test_window=test_window, extra=extra,
    )
    (out_dir / "train_result.json").write_text(res.to_json())
    return res


def train_handbook(
    parquet_path: str | Path,
    out_dir: str | Path,
    framework: str = "xgboost",
    train_start: str = "2018-07-25",
    train_end: str = "2018-07-31",
    delay_days: int = LABEL_DELAY_DAYS,
    test_start: str = "2018-08-08",
    test_end: str = "2018-08-14",
    params: dict[str, Any] | None = None,
    rounds: int | None = None,
    cold_start_fraction: float = COLD_START_FRACTION,
) -> TrainResult:
    """Train on the handbook file with the handbook protocol; metrics are on the test week."""
    payments = read_payments_file(parquet_path)
    return _train_protocol(payments, out_dir, framework, train_start, train_end, delay_days, test_start, test_end, params, rounds,
                           cold_start_fraction)


def _train_protocol(
    payments: pd.DataFrame, out_dir: str | Path, framework: str, train_start: str, train_end: str, delay_days: int,
    test_start: str, test_end: str, params: dict[str, Any] | None = None, rounds: int | None = None,
    cold_start_fraction: float = COLD_START_FRACTION,
) -> TrainResult:
    feats = payments_features(payments)
    t0, t1 = pd.Timestamp(train_start), pd.Timestamp(test_start)
    train_days = (pd.Timestamp(train_end) - t0).days + 1
    test_days = (pd.Timestamp(test_end) - t1).days + 1
    if (t1 - t0).days != train_days + delay_days:
        raise ValueError("test_start must be train_end + delay_days + 1 day")
    tr, te = ev.train_test_split_handbook(payments, t0, train_days, delay_days, test_days)
    X = feats.to_numpy(np.float32)
    y = (payments["is_fraud"].to_numpy() == 1).astype(np.float32)
    X_fit, y_fit = _augment_cold(payments, tr, X, y, cold_start_fraction)
    booster, p = _fit(framework, X_fit, y_fit, params, rounds)
    p = {**p, "cold_start_fraction": cold_start_fraction}
    metrics = ev.evaluate_scores(payments.loc[te], _predict(framework, booster, X[te])) if te.any() else {}
    return _finish(
        framework, booster, p, out_dir, X[tr], y[tr], payments.loc[tr, "customer_id"].to_numpy(),
        payments.loc[tr], feats.loc[tr], rounds, metrics, (str(train_start), str(train_end)), (str(test_start), str(test_end)),
        {"n_train": int(tr.sum()), "n_test": int(te.sum())},
    )


def train_on_payments(
    payments: pd.DataFrame,
    out_dir: str | Path,
    framework: str = "xgboost",
    train_days: int = 7,
    delay_days: int = LABEL_DELAY_DAYS,
    test_days: int = 7,
    params: dict[str, Any] | None = None,
    rounds: int | None = None,
    cold_start_fraction: float = COLD_START_FRACTION,
) -> TrainResult:
    """Train on normalised payments (e.g. simulated): the last ``train_days + delay + test_days``
    days follow the handbook protocol (test metrics = the holdout); with too few days the last
    20 % of the cards are held out instead."""
    payments = payments.sort_values("timestamp", kind="stable").reset_index(drop=True)
    days = pd.to_datetime(payments["timestamp"]).dt.normalize()
    first, last = days.min(), days.max()
    need = train_days + delay_days + test_days
    if (last - first).days + 1 >= need + 7:  # keep a week of history for the windows
        t0 = last - pd.Timedelta(days=need - 1)

        def fmt(d: pd.Timestamp) -> str:
            return d.strftime("%Y-%m-%d")

        return _train_protocol(
            payments, out_dir, framework, fmt(t0), fmt(t0 + pd.Timedelta(days=train_days - 1)), delay_days,
            fmt(t0 + pd.Timedelta(days=train_days + delay_days)), fmt(last), params, rounds, cold_start_fraction,
        )
    feats = payments_features(payments)
    X = feats.to_numpy(np.float32)
    y = (payments["is_fraud"].to_numpy() == 1).astype(np.float32)
    cards = payments["customer_id"].to_numpy()
    uniq, inv = np.unique(cards, return_inverse=True)
    hold = (np.random.default_rng(SEED).random(len(uniq)) < 0.2)[inv]
    X_fit, y_fit = _augment_cold(payments, ~hold, X, y, cold_start_fraction)
    booster, p = _fit(framework, X_fit, y_fit, params, rounds)
    p = {**p, "cold_start_fraction": cold_start_fraction}
    s = _predict(framework, booster, X[hold])
    metrics: dict[str, float] = {}
    if hold.any() and 0 < y[hold].sum() < hold.sum():
        metrics = {"auc_roc": ev.auc_roc(y[hold], s), "average_precision": ev.average_precision(y[hold], s)}
    win = (str(first.date()), str(last.date()))
    return _finish(framework, booster, p, out_dir, X[~hold], y[~hold], cards[~hold], payments.loc[~hold], feats.loc[~hold],
                   rounds, metrics, win, win, {"holdout": "20% of cards"})

