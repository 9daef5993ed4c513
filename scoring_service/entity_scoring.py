"""Entity risk: the one definition shared by the nightly batch and the replay backfill.

For a point in time ``as_of`` and the payments known then (timestamps <= ``as_of``; labels only
where they had arrived), every *entity* - customer (card) and terminal - that is active in the
feature window gets one :class:`~scoring_service.cache_layout.CacheEntry`:

``state``
    the aggregates ``features.entity_states(payments, as_of)`` gives (customers with a payment
    in the last 30 days, terminals with one in the last 30 + label-delay days); the online path
    adds a new payment to them with ``features.online_features``.
``risk_score``
    the model's **highest score over the entity's payments in the ``lookback_days`` before
    ``as_of``** (``as_of - lookback < t <= as_of``), each payment scored on its own features from
    ``features.payments_features`` (so windows and label delay are the model's own); 0.0 when the
    entity made no payment in the lookback. This is how the handbook's Card Precision ranks cards
    (a card's score is the max of its payments' scores).
``reasons``
    ``model.explain`` (SHAP top-3) of that max-scoring payment; ties go to the earliest payment.
    Only those rows are explained: SHAP costs ~6x a prediction.
``computed_at``
    ``as_of`` in epoch seconds (never the wall clock, so the same window gives the same entries).

The result is a pure function of (payments, as_of, model, lookback): running it twice on the same
window gives identical entries, which is what makes nightly runs and replays idempotent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scoring_service import features
from scoring_service.cache_layout import CacheEntry

DAY_S = 86400.0


def _as_of_seconds(as_of: Any) -> float:
    if isinstance(as_of, (int, float)) and not isinstance(as_of, bool):
        return float(as_of)
    t = pd.Timestamp(as_of)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    return (t.value // 1000) / 1e6


def _predict(model: Any, X: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.empty(len(X), dtype=np.float64)
    for i in range(0, len(X), batch_size):
        out[i: i + batch_size] = np.asarray(model.predict(X[i: i + batch_size]), dtype=np.float64).reshape(-1)
    return out


def _explain(model: Any, X: np.ndarray, batch_size: int) -> list[list[tuple[str, str, float]]]:
    out: list[list[tuple[str, str, float]]] = []
    for i in range(0, len(X), batch_size):
        for row in model.explain(X[i: i + batch_size], top_k=3):
            out.append([(str(c), str(f), float(v)) for c, f, v in row])
    return out


def _argmax_by(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entity ids, max score, row index of the first max) per entity; rows are in time order."""
    if len(ids) == 0:
        return ids, scores, np.empty(0, dtype=np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    rows = np.arange(len(ids))
    # sort by entity, score descending, row ascending: the first row of each entity is its max
    order = np.lexsort((rows, -scores, inv))
    first = np.ones(len(order), dtype=bool)
    first[1:] = inv[order][1:] != inv[order][:-1]
    best = order[first]
    return uniq, scores[best], best


def build_entries(
    payments: pd.DataFrame,
    as_of: Any,
    model: Any,
    model_version: str,
    generation: str,
    lookback_days: int = 7,
    batch_size: int = 65536,
    *,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, CacheEntry], dict[str, CacheEntry]]:
    """(customer entries, terminal entries) as of ``as_of``; see the module docstring.

    ``payments``: the normalised payments frame, sorted by time, ``is_fraud`` -1 where the label
    had not arrived by ``as_of``. It must reach back 30 + label-delay days before the lookback
    (the feature windows). ``timings`` (optional) receives ``features``/``score``/``explain``
    seconds.
    """
    import time

    t0 = time.perf_counter()
    a = _as_of_seconds(as_of)
    ts = payments["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64") / 1e9
    known = payments.loc[ts <= a]
    X_all = features.payments_features(known)
    kts = ts[ts <= a]
    in_lookback = kts > a - lookback_days * DAY_S
    recent = known.loc[in_lookback]
    X = np.ascontiguousarray(X_all.to_numpy(dtype=np.float32)[in_lookback])
    cust_states, term_states = features.entity_states(known, pd.Timestamp(int(round(a * 1e6)), unit="us"))
    t1 = time.perf_counter()
    scores = _predict(model, X, batch_size) if len(X) else np.empty(0, dtype=np.float64)
    t2 = time.perf_counter()

    c_ids, c_max, c_row = _argmax_by(recent["customer_id"].to_numpy().astype(str), scores)
    t_ids, t_max, t_row = _argmax_by(recent["terminal_id"].to_numpy().astype(str), scores)
    rows = np.unique(np.concatenate([c_row, t_row])) if len(scores) else np.empty(0, dtype=np.int64)
    reasons_of: dict[int, list[tuple[str, str, float]]] = {}
    if len(rows):
        for r, reasons in zip(rows.tolist(), _explain(model, X[rows], batch_size)):
            reasons_of[r] = reasons
    t3 = time.perf_counter()

    c_best = {cid: (float(s), int(r)) for cid, s, r in zip(c_ids.tolist(), c_max.tolist(), c_row.tolist())}
    t_best = {tid: (float(s), int(r)) for tid, s, r in zip(t_ids.tolist(), t_max.tolist(), t_row.tolist())}

    def entries(states: dict[str, dict[str, float]], best: dict[str, tuple[float, int]]) -> dict[str, CacheEntry]:
        out: dict[str, CacheEntry] = {}
        for eid in sorted(set(states) | set(best)):
            score, row = best.get(eid, (0.0, -1))
            out[eid] = CacheEntry(
                risk_score=score,
                state=states.get(eid, {}),
                model_version=model_version,
                computed_at=a,
                reasons=reasons_of.get(row, []) if row >= 0 else [],
                generation=generation,
            )
        return out

    customers = entries(cust_states, c_best)
    terminals = entries(term_states, t_best)
    if timings is not None:
        timings["features"] = timings.get("features", 0.0) + (t1 - t0)
        timings["score"] = timings.get("score", 0.0) + (t2 - t1)
        timings["explain"] = timings.get("explain", 0.0) + (t3 - t2)
    return customers, terminals
