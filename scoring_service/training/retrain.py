"""``fraudscore retrain --as-of D``: train a candidate on the latest labelled window, compare it with
the active version on the latest fully labelled week, register it as shadow, and say whether the
promotion gate (``training.promotion``) lets it replace the active version.

Windows (days, ends exclusive; ``delay`` = ``LABEL_DELAY_DAYS``, every label of a payment has
arrived ``delay`` days after it):

    evaluation week  [D - delay - 7, D - delay)          the latest week fully labelled by D
    training window  [eval start - delay - train_days, eval start - delay)
    read             [training start - FEATURE_WINDOW_DAYS, D - delay)   (the features' history)

which is the handbook protocol's shape (train, ``delay`` days skipped, test), so training is
``train._train_protocol`` itself (features, cold-start rows, thresholds, policy: as ``fraudscore
train``), and the evaluation week leaves out the known-compromised cards as
``evaluation.train_test_split_handbook`` does. Labels are only those that had arrived by D.

Both versions are evaluated on that week: AUC, AP, CP@100, the per-day figures, and the new-card
slice (payments 1-10 of the cards first seen in the week: no payment in the read window before it),
decided as the service's model path decides (``core.policy.Policy``: the model's score raised to
the payment's floor, then the version's thresholds).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError, sha256_file
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.core.features import FEATURE_NAMES, FEATURE_WINDOW_DAYS, LABEL_DELAY_DAYS, payments_features
from scoring_service.core.features.velocity import Velocity, payments_velocity
from scoring_service.core.metrics import auc_roc, average_precision, card_precision_per_day
from scoring_service.core.policy import DECLINE, REVIEW, Policy
from scoring_service.training import evaluation as ev
from scoring_service.training import promotion
from scoring_service.training import train as training

EVAL_DAYS = 7
TRAIN_DAYS = 7  # the default training window (``--train-days``)
MIN_FRAUDS = 20  # the fewest labelled frauds in the training window worth a model
NEW_CARD_PAYMENTS = 10  # payments 1-10 of a card first seen in the evaluation week
K = 100


class RetrainError(Exception):
    """Bad input: one line, nothing registered, the active version untouched."""


@dataclass(frozen=True)
class Windows:
    as_of: pd.Timestamp
    read_start: pd.Timestamp
    train_start: pd.Timestamp
    train_days: int
    delay_days: int
    eval_start: pd.Timestamp
    eval_end: pd.Timestamp  # exclusive

    def as_dict(self) -> dict[str, str]:
        day = pd.Timedelta(days=1)
        fmt = "%Y-%m-%d"
        return {
            "as_of": self.as_of.strftime(fmt),
            "train": f"{self.train_start:{fmt}}..{self.train_start + (self.train_days * day) - day:{fmt}}",
            "evaluation": f"{self.eval_start:{fmt}}..{self.eval_end - day:{fmt}}",
        }


def windows(as_of: Any, train_days: int = TRAIN_DAYS, delay_days: int = LABEL_DELAY_DAYS) -> Windows:
    d = pd.Timestamp(as_of)
    d = (d.tz_convert("UTC").tz_localize(None) if d.tzinfo else d).normalize()
    eval_end = d - pd.Timedelta(days=delay_days)
    eval_start = eval_end - pd.Timedelta(days=EVAL_DAYS)
    train_start = eval_start - pd.Timedelta(days=delay_days + train_days)
    return Windows(d, train_start - pd.Timedelta(days=FEATURE_WINDOW_DAYS), train_start, train_days, delay_days,
                   eval_start, eval_end)


def check_window(payments: pd.DataFrame, w: Windows, min_frauds: int = MIN_FRAUDS) -> None:
    """RetrainError (one line) when the read window cannot give a model and its evaluation."""
    d = w.as_dict()
    if payments.empty:
        raise RetrainError(f"no payments between {w.read_start:%Y-%m-%d} and {w.eval_end:%Y-%m-%d} (as of {d['as_of']})")
    day = pd.to_datetime(payments["timestamp"]).dt.normalize()
    label = payments["is_fraud"].to_numpy()
    for name, start, end in (("training window", w.train_start, w.eval_start - pd.Timedelta(days=w.delay_days)),
                             ("evaluation week", w.eval_start, w.eval_end)):
        m = ((day >= start) & (day < end)).to_numpy()
        if not m.any():
            raise RetrainError(f"no payments in the {name} {d['train' if name[0] == 't' else 'evaluation']}")
        if (label[m] < 0).all():
            raise RetrainError(f"no labels in the {name} {d['train' if name[0] == 't' else 'evaluation']} "
                               f"(labels that arrived by {d['as_of']})")
        frauds = int((label[m] == 1).sum())
        need = min_frauds if name[0] == "t" else 1
        if frauds < need:
            raise RetrainError(f"too few frauds in the {name} {d['train' if name[0] == 't' else 'evaluation']}: "
                               f"{frauds} < {need}")


def new_card_slice(payments: pd.DataFrame, w: Windows, n: int = NEW_CARD_PAYMENTS) -> np.ndarray:
    """Payments 1..n of the cards whose first payment in ``payments`` (time-sorted) is in the evaluation week."""
    ts = pd.to_datetime(payments["timestamp"])
    cards = payments["customer_id"]
    first = ts.groupby(cards).transform("min")
    rank = ts.groupby(cards).cumcount() + 1
    return ((first >= w.eval_start) & (first < w.eval_end) & (rank <= n)).to_numpy()


def decisions(scores: np.ndarray, rows: pd.DataFrame, feats: pd.DataFrame, velocity: pd.DataFrame,
              thresholds: dict[str, float], policy: dict[str, float]) -> np.ndarray:
    """What the service's model path decides for these payments: the model's score raised to the
    payment's floor (``Policy.apply``), then the thresholds (``Policy.decide``)."""
    pol = Policy.of(thresholds, policy)
    out = []
    ratio = feats["amount_ratio_avg_30d"].to_numpy(np.float64)
    history = feats["customer_nb_tx_30d"].to_numpy(np.float64) - 1.0  # the state counts the payments before
    amount = rows["amount"].to_numpy(np.float64)
    vel = velocity[["nb_tx_1h", "nb_tx_1d", "seconds_since_last"]].to_numpy(np.float64)
    for i, s in enumerate(scores):
        state = ({"avg_amount_30d": amount[i] / ratio[i], "nb_tx_30d": history[i]}
                 if history[i] > 0 and ratio[i] > 0 else None)
        risk, _ = pol.apply(float(s), [], float(amount[i]), state, velocity=Velocity(*vel[i]))
        out.append(pol.decide(risk))
    return np.array(out, dtype=object)


@dataclass
class Evaluation:
    """The evaluation week, computed once for every version evaluated on it."""

    payments: pd.DataFrame
    X: np.ndarray
    feats: pd.DataFrame
    test: np.ndarray  # the week, known-compromised cards left out
    new_cards: np.ndarray
    velocity: pd.DataFrame

    @classmethod
    def of(cls, payments: pd.DataFrame, w: Windows) -> Evaluation:
        feats = payments_features(payments)
        _, test = ev.train_test_split_handbook(payments, w.train_start, w.train_days, w.delay_days, EVAL_DAYS)
        return cls(payments, feats.to_numpy(np.float32), feats, test, new_card_slice(payments, w),
                   payments_velocity(payments))

    def report(self, predict: Callable[[np.ndarray], np.ndarray], thresholds: dict[str, float],
               policy: dict[str, float]) -> tuple[dict[str, Any], np.ndarray]:
        """AUC, AP, CP@100, per day, and the new-card slice of one version; its scores on ``test``."""
        te = self.payments.loc[self.test]
        scores = predict(self.X[self.test])
        y = (te["is_fraud"].to_numpy() == 1).astype(int)
        metrics = ev.evaluate_scores(te, scores, K)
        days = pd.to_datetime(te["timestamp"]).dt.strftime("%Y-%m-%d").to_numpy()
        cp = card_precision_per_day(te.assign(score=scores), K)
        per_day = {}
        for d in sorted(set(days)):
            m = days == d
            both = 0 < y[m].sum() < m.sum()
            per_day[d] = {"payments": int(m.sum()), "frauds": int(y[m].sum()),
                          "auc_roc": auc_roc(y[m], scores[m]) if both else None,
                          "average_precision": average_precision(y[m], scores[m]) if both else None,
                          f"card_precision_at_{K}": cp.get(d)}
        nc = self.new_cards
        rows = self.payments.loc[nc]
        decided = decisions(predict(self.X[nc]), rows, self.feats.loc[nc], self.velocity.loc[nc], thresholds, policy)
        genuine = rows["is_fraud"].to_numpy() == 0
        n_gen = int(genuine.sum())
        new_cards = {"cards": int(rows["customer_id"].nunique()), "payments": len(rows), "genuine": n_gen,
                     "genuine_decline_rate": float((decided[genuine] == DECLINE).mean()) if n_gen else None,
                     "genuine_review_rate": float((decided[genuine] == REVIEW).mean()) if n_gen else None}
        return {"metrics": metrics, "per_day": per_day, "new_cards": new_cards}, scores


def day_scores(ev_: Evaluation, candidate: tuple[dict[str, Any], np.ndarray],
               active: tuple[dict[str, Any], np.ndarray]) -> list[promotion.DayScores]:
    te = ev_.payments.loc[ev_.test]
    y = (te["is_fraud"].to_numpy() == 1).astype(int)
    days = pd.to_datetime(te["timestamp"]).dt.strftime("%Y-%m-%d").to_numpy()
    cp = f"card_precision_at_{K}"
    out = []
    for d in sorted(set(days)):
        m = days == d
        out.append(promotion.DayScores(y[m], candidate[1][m], active[1][m],
                                       float(candidate[0]["per_day"][d][cp] or 0.0),
                                       float(active[0]["per_day"][d][cp] or 0.0)))
    return out


@dataclass
class Outcome:
    record: ModelRecord
    windows: Windows
    candidate: dict[str, Any]
    active: dict[str, Any] | None
    active_version: str | None
    gate: promotion.GateDecision
    train_seconds: float = 0.0


def retrain_and_register(
    registry: Registry, models_dir: Path, payments: pd.DataFrame, w: Windows, *, framework: str = "xgboost",
    active: tuple[ModelRecord, Any] | None = None, active_error: str | None = None, min_frauds: int = MIN_FRAUDS,
    rounds: int | None = None,
) -> Outcome:
    """Train the candidate on ``payments`` (the read window, labels as of D), evaluate it and the
    ``active`` (record, loaded model), ask the gate, register the candidate as shadow with both
    reports and the gate's decision (in ``metrics["gate"]``, so the ``register`` audit event
    carries it). RetrainError (nothing registered) on bad input or a candidate that does not load."""
    import time

    payments = payments.sort_values(["timestamp", "transaction_id"], kind="stable").reset_index(drop=True)
    check_window(payments, w, min_frauds)
    version = registry.next_version("xgb" if framework == "xgboost" else "lgbm")
    out_dir = models_dir / version
    day = pd.Timedelta(days=1)
    started = time.monotonic()
    try:
        result = training._train_protocol(
            payments, out_dir, framework, f"{w.train_start:%Y-%m-%d}",
            f"{w.train_start + (w.train_days * day) - day:%Y-%m-%d}", w.delay_days, f"{w.eval_start:%Y-%m-%d}",
            f"{w.eval_end - day:%Y-%m-%d}", rounds=rounds)
        sha = sha256_file(result.artifact_path)
        model = GbdtModel.load(result.artifact_path, result.framework, result.feature_names, expected_sha256=sha,
                               device="cpu")
    except (ModelError, ValueError) as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise RetrainError(f"the candidate cannot be used: {exc}") from None
    train_seconds = time.monotonic() - started
    evaluation = Evaluation.of(payments, w)
    cand = evaluation.report(model.predict, result.thresholds, result.policy)
    act = None
    if active is not None and active_error is None:
        if list(active[0].feature_names) != list(FEATURE_NAMES):
            active_error = f"{active[0].version} has other features than the service's"
        else:
            act = evaluation.report(active[1].predict, active[0].thresholds, active[0].policy)
    gate = promotion.decide(cand[0], act[0] if act else None, day_scores(evaluation, cand, act) if act else (),
                            active_error=active_error)
    active_version = active[0].version if active else None
    record = registry.register(
        version=version, framework=result.framework, artifact_path=str(Path(result.artifact_path).resolve()),
        sha256=sha, feature_names=result.feature_names, thresholds=result.thresholds,
        policy={k: v for k, v in result.policy.items() if math.isfinite(v)},  # JSON holds no infinity
        metrics={**cand[0]["metrics"], "gate": {**gate.as_dict(), "active": active_version}},
        params={**result.params, "train_window": list(result.train_window), "test_window": list(result.test_window),
                "drift_profile": result.extra.get("drift_profile"),
                "retrain": {"windows": w.as_dict(), "candidate": cand[0], "active": act[0] if act else None,
                            "active_version": active_version, "active_error": active_error}},
        description=f"retrain as of {w.as_of:%Y-%m-%d}", activate=False,
    )
    return Outcome(record, w, cand[0], act[0] if act else None, active_version, gate, train_seconds)
