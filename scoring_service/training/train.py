"""Training of the fraud GBDT (XGBoost or LightGBM) on normalised payments.

Protocol (the handbook's): features are computed on the whole payments file first, the model is
trained on one week, ``delay_days`` are skipped, the following week is the test week (known
compromised cards left out, see ``evaluation.train_test_split_handbook``).

Thresholds (chosen on the *training* week's out-of-fold scores, 4 folds over cards, so the test
week is never used):
    decline: the lowest score whose precision is >= 0.8 (ties go to the safer, higher score);
    review: the highest score whose recall is >= 0.8, not above decline.

Policy (transaction level, used by the online cache path without the model), from the training
week's payments:
    high_amount: the lowest amount A such that the fraud rate of the payments with amount >= A
        is >= 0.9 (searched over the observed amounts; above it nearly every payment is fraud);
    amount_ratio_decline: the ratio amount / customer's avg_amount_30d (the state's key, i.e. the
        average of the customer's payments before this one; feature ``amount_ratio_avg_30d``)
        above which the fraud rate is >= 0.8 (payments whose customer had earlier payments);
    amount_ratio_review: the 99.5th percentile of the ratio among genuine payments.

Model choice: see ``docs/model.md`` (validation weeks, never the test week).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scoring_service.training import evaluation as ev
from scoring_service.core.features import FEATURE_NAMES, LABEL_DELAY_DAYS, load_payments, payments_features, payments_features_cold_customer

SEED = 0
# share of the training payments added a second time with the features of an unseen customer
# (the online path meets new cards; without them an unseen card paying 500 scored only 0.49)
COLD_START_FRACTION = 0.1

XGB_PARAMS: dict = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    "max_bin": 4096,  # a split exactly at the sharp amount > 220 threshold (see RECIPES.md)
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

LGB_PARAMS: dict = {
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
    params: dict
    train_window: tuple[str, str]
    test_window: tuple[str, str]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["artifact_path"] = str(self.artifact_path)
        return json.dumps(d, indent=2, default=float)


# ----------------------------------------------------------------------------------------------
def _fit(framework: str, X: np.ndarray, y: np.ndarray, params: dict | None = None, rounds: int | None = None):
    if framework == "xgboost":
        import xgboost as xgb

        p = {**XGB_PARAMS, **(params or {})}
        booster = xgb.train(p, xgb.DMatrix(X, label=y, feature_names=FEATURE_NAMES), rounds or XGB_ROUNDS)
        return booster, p
    if framework == "lightgbm":
        import lightgbm as lgb

        p = {**LGB_PARAMS, **(params or {})}
        booster = lgb.train(p, lgb.Dataset(X, label=y, feature_name=FEATURE_NAMES, free_raw_data=True), rounds or LGB_ROUNDS)
        return booster, p
    raise ValueError(f"unknown framework {framework!r} (xgboost | lightgbm)")


def _augment_cold(payments: pd.DataFrame, mask: np.ndarray, X: np.ndarray, y: np.ndarray, fraction: float):
    """Training rows plus a seeded sample of them recomputed as unseen customers."""
    if fraction <= 0 or not mask.any():
        return X[mask], y[mask]
    idx = np.flatnonzero(mask)
    pick = idx[np.random.default_rng(SEED).random(len(idx)) < fraction]
    cold = payments_features_cold_customer(payments).to_numpy(np.float32)[pick]
    return np.vstack([X[mask], cold]), np.r_[y[mask], y[pick]]


def _predict(framework: str, booster, X: np.ndarray) -> np.ndarray:
    if framework == "xgboost":
        return np.asarray(booster.inplace_predict(X), dtype=np.float64)
    return np.asarray(booster.predict(X), dtype=np.float64)


def _save(framework: str, booster, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if framework == "xgboost":
        path = out_dir / "model.ubj"
        booster.save_model(str(path))
    else:
        path = out_dir / "model.txt"
        booster.save_model(str(path))
    return path


def _oof_scores(framework: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, params, rounds, n_folds: int = 4) -> np.ndarray:
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


def choose_thresholds(y: np.ndarray, scores: np.ndarray, decline_precision: float = 0.8, review_recall: float = 0.8) -> dict[str, float]:
    """decline: lowest score with precision >= 0.8 among payments scored >= it; review: highest
    score keeping recall >= 0.8 (capped at decline). Falls back to 0.9 / 0.5 without frauds."""
    y = np.asarray(y).astype(bool)
    if y.sum() == 0:
        return {"review": 0.5, "decline": 0.9}
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    tp = np.cumsum(yy)
    k = np.arange(1, len(s) + 1)
    # only positions at the end of a run of equal scores are achievable thresholds
    last = np.r_[s[1:] != s[:-1], True]
    prec = tp / k
    rec = tp / y.sum()
    ok = np.flatnonzero(last & (prec >= decline_precision))
    decline = float(s[ok.max()]) if len(ok) else float(min(1.0, s.max()))
    okr = np.flatnonzero(last & (rec >= review_recall))
    review = float(s[okr.min()]) if len(okr) else float(s.min())
    review = min(review, decline)
    return {"review": review, "decline": decline}


def learn_policy(payments: pd.DataFrame, features: pd.DataFrame) -> dict[str, float]:
    """Transaction-level policy values from labelled payments (see the module docstring)."""
    y = payments["is_fraud"].to_numpy() == 1
    amount = payments["amount"].to_numpy(np.float64)
    # high_amount: scan amounts from the top; fraud rate of payments >= A
    order = np.argsort(-amount, kind="stable")
    a_sorted, y_sorted = amount[order], y[order]
    rate = np.cumsum(y_sorted) / np.arange(1, len(y_sorted) + 1)
    last = np.r_[a_sorted[1:] != a_sorted[:-1], True]
    ok = np.flatnonzero(last & (rate >= 0.9))
    # the lowest amount such that every threshold above it also keeps the rate >= 0.9
    bad = np.flatnonzero(last & (rate < 0.9))
    first_bad = bad.min() if len(bad) else len(a_sorted)
    ok = ok[ok < first_bad]
    high_amount = float(a_sorted[ok.max()]) if len(ok) else float(amount.max() + 1.0 if len(amount) else 1e9)
    # amount / the customer's average of the previous 30 days
    ratio = features["amount_ratio_avg_30d"].to_numpy(np.float64)
    has_hist = features["customer_nb_tx_30d"].to_numpy() > 1
    r, yr = ratio[has_hist], y[has_hist]
    review = float(np.quantile(r[~yr], 0.995)) if (~yr).any() else 3.0
    decline = review
    if yr.any():
        grid = np.unique(np.quantile(r, np.linspace(0.9, 1.0, 201)))
        for g in grid:
            m = r >= g
            if m.sum() >= 5 and yr[m].mean() >= 0.8:
                decline = float(g)
                break
        else:
            decline = float(max(review, np.quantile(r[yr], 0.5)))
    decline = max(decline, review)

    def rate(mask: np.ndarray, labels: np.ndarray) -> float:
        return float(labels[mask].mean()) if mask.any() else 0.0

    # How often each rule was right in training: the score a payment gets when the rule fires.
    return {
        "amount_ratio_review": review,
        "amount_ratio_decline": decline,
        "high_amount": high_amount,
        "high_amount_fraud_rate": rate(amount >= high_amount, y),
        "amount_ratio_decline_fraud_rate": rate(r >= decline, yr),
        "amount_ratio_review_fraud_rate": rate(r >= review, yr),
    }


def _finish(framework, booster, params, out_dir, X_tr, y_tr, groups_tr, pay_tr, feat_tr, rounds, metrics, train_window, test_window, extra):
    out_dir = Path(out_dir)
    path = _save(framework, booster, out_dir)
    oof = _oof_scores(framework, X_tr, y_tr, groups_tr, params, rounds)
    thresholds = choose_thresholds(y_tr, oof)
    policy = learn_policy(pay_tr, feat_tr)
    res = TrainResult(
        artifact_path=path, framework=framework, feature_names=list(FEATURE_NAMES), thresholds=thresholds,
        policy=policy, metrics=metrics, params=params, train_window=train_window, test_window=test_window, extra=extra,
    )
    (out_dir / "train_result.json").write_text(res.to_json())
    return res


def train_handbook(
    parquet_path,
    out_dir,
    framework: str = "xgboost",
    train_start: str = "2018-07-25",
    train_end: str = "2018-07-31",
    delay_days: int = LABEL_DELAY_DAYS,
    test_start: str = "2018-08-08",
    test_end: str = "2018-08-14",
    params: dict | None = None,
    rounds: int | None = None,
    cold_start_fraction: float = COLD_START_FRACTION,
) -> TrainResult:
    """Train on the handbook file with the handbook protocol; metrics are on the test week."""
    payments = load_payments(parquet_path)
    return _train_protocol(payments, out_dir, framework, train_start, train_end, delay_days, test_start, test_end, params, rounds,
                           cold_start_fraction)


def _train_protocol(payments, out_dir, framework, train_start, train_end, delay_days, test_start, test_end, params=None, rounds=None,
                    cold_start_fraction=COLD_START_FRACTION):
    feats = payments_features(payments)
    t0, t1 = pd.Timestamp(train_start), pd.Timestamp(test_start)
    train_days = (pd.Timestamp(train_end) - t0).days + 1
    test_days = (pd.Timestamp(test_end) - t1).days + 1
    if (t1 - t0).days != train_days + delay_days:
        raise ValueError("test_start must be train_end + delay_days + 1 day")
    tr, te = ev.train_test_split_handbook(payments, t0, train_days, delay_days, test_days)
    X = feats.to_numpy(np.float32)
    y = (payments["is_fraud"].to_numpy() == 1).astype(np.float32)
    booster, p = _fit(framework, *_augment_cold(payments, tr, X, y, cold_start_fraction), params, rounds)
    p = {**p, "cold_start_fraction": cold_start_fraction}
    metrics = ev.evaluate_scores(payments.loc[te], _predict(framework, booster, X[te])) if te.any() else {}
    return _finish(
        framework, booster, p, out_dir, X[tr], y[tr], payments.loc[tr, "customer_id"].to_numpy(),
        payments.loc[tr], feats.loc[tr], rounds, metrics, (str(train_start), str(train_end)), (str(test_start), str(test_end)),
        {"n_train": int(tr.sum()), "n_test": int(te.sum())},
    )


def train_on_payments(
    payments: pd.DataFrame,
    out_dir,
    framework: str = "xgboost",
    train_days: int = 7,
    delay_days: int = LABEL_DELAY_DAYS,
    test_days: int = 7,
    params: dict | None = None,
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
        fmt = lambda d: d.strftime("%Y-%m-%d")  # noqa: E731
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
    booster, p = _fit(framework, *_augment_cold(payments, ~hold, X, y, cold_start_fraction), params, rounds)
    p = {**p, "cold_start_fraction": cold_start_fraction}
    s = _predict(framework, booster, X[hold])
    metrics = {}
    if hold.any() and 0 < y[hold].sum() < hold.sum():
        metrics = {"auc_roc": ev.auc_roc(y[hold], s), "average_precision": ev.average_precision(y[hold], s)}
    win = (str(first.date()), str(last.date()))
    return _finish(framework, booster, p, out_dir, X[~hold], y[~hold], cards[~hold], payments.loc[~hold], feats.loc[~hold],
                   rounds, metrics, win, win, {"holdout": "20% of cards"})


if __name__ == "__main__":  # python -m scoring_service.training.train PARQUET OUT_DIR [framework]
    import sys
    import time

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t = time.time()
    r = train_handbook(sys.argv[1], sys.argv[2], *(sys.argv[3:4] or []))
    print(r.to_json())
    print(f"train_handbook: {time.time() - t:.1f} s")
