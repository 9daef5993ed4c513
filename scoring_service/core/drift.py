"""Drift: the population stability index (PSI) of each model feature and of the score.

One definition, used by training (the reference profile stored with the version), the live service
(``fraudscore_feature_psi``) and the backtest report (per day):

* **Bins**: the deciles of the training values (``bin_edges``: the 10 %, ..., 90 % quantiles, ties
  merged, so a feature with few distinct values gets fewer bins); bin ``i`` holds the values
  ``edges[i-1] < x <= edges[i]``, the first and last bins are open.
* **PSI** = sum over bins of ``(actual - expected) * ln(actual / expected)``, the shares floored at
  ``EPSILON`` so an empty bin counts as rare, not infinite. Usual reading: < 0.1 stable, 0.1-0.2
  moderate, > 0.2 (``DEFAULT_THRESHOLD``) a shift worth looking at.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

EPSILON = 1e-4
DEFAULT_THRESHOLD = 0.2
SCORE = "score"  # the profile's key of the score's distribution


def bin_edges(values: ArrayLike, bins: int = 10) -> list[float]:
    """The inner edges of ``bins`` quantile bins of ``values`` (ties merged; NaN ignored)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return []
    qs = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], method="lower")  # edges are values seen: ties merge
    return [float(e) for e in np.unique(qs)]


def bin_counts(values: ArrayLike, edges: ArrayLike) -> NDArray[np.int64]:
    """How many of ``values`` fall in each of the ``len(edges) + 1`` bins (NaN ignored)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    e = np.asarray(edges, dtype=np.float64).ravel()
    idx = np.searchsorted(e, x, side="left")
    return np.bincount(idx, minlength=e.size + 1).astype(np.int64)


def shares(values: ArrayLike, edges: ArrayLike) -> list[float]:
    counts = bin_counts(values, edges)
    total = counts.sum()
    return [float(c) / total for c in counts] if total else [0.0] * len(counts)


def psi(expected: ArrayLike, actual: ArrayLike) -> float:
    """PSI of two distributions over the same bins (shares or counts: each is normalised)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"expected and actual need the same bins, got {e.shape} and {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    e = np.maximum(e / e.sum(), EPSILON)
    a = np.maximum(a / a.sum(), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def profile(features: ArrayLike, scores: ArrayLike, names: Sequence[str], bins: int = 10) -> dict[str, Any]:
    """The reference distribution of each feature column and of the score: ``{name: {edges, shares}}``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"features need one column per name ({len(names)}), got shape {x.shape}")
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        edges = bin_edges(x[:, j], bins)
        out[name] = {"edges": edges, "shares": shares(x[:, j], edges)}
    edges = bin_edges(scores, bins)
    out[SCORE] = {"edges": edges, "shares": shares(scores, edges)}
    return out


def psi_of(reference: dict[str, Any], name: str, values: ArrayLike) -> float:
    """PSI of ``values`` against the reference profile's distribution of ``name``."""
    ref = reference[name]
    return psi(ref["shares"], bin_counts(values, ref["edges"]))


class LiveDrift:
    """Bin counts of the rows a model scores, against its reference profile; PSI on demand.

    ``observe`` only buffers the row (cheap, on the request path); the counts are brought up to date
    in bulk every ``flush_every`` rows and when read. Thread-safe (read from the metrics thread).
    """

    def __init__(self, reference: dict[str, Any], names: Sequence[str], *, flush_every: int = 256) -> None:
        self.names = [n for n in names if n in reference]
        self._columns = [list(names).index(n) for n in self.names]
        self._edges = [np.asarray(reference[n]["edges"], dtype=np.float64) for n in self.names]
        self._expected = [np.asarray(reference[n]["shares"], dtype=np.float64) for n in self.names]
        self._counts = [np.zeros(len(e) + 1, dtype=np.int64) for e in self._edges]
        score = reference.get(SCORE)
        self._score_edges = np.asarray(score["edges"] if score else [], dtype=np.float64)
        self._score_expected = np.asarray(score["shares"] if score else [1.0], dtype=np.float64)
        self._score_counts = np.zeros(len(self._score_edges) + 1, dtype=np.int64)
        self._pending: list[tuple[ArrayLike, float]] = []  # appended on the event loop, swapped out whole by flush
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self.rows = 0

    def observe(self, row: ArrayLike, score: float) -> None:
        self._pending.append((row, score))
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending:
                return
            rows = [r for r, _ in pending]
            scores = [s for _, s in pending]
            x = np.asarray(np.stack([np.asarray(r, dtype=np.float64) for r in rows]))
            for k, j in enumerate(self._columns):
                self._counts[k] += bin_counts(x[:, j], self._edges[k])
            self._score_counts += bin_counts(scores, self._score_edges)
            self.rows += len(rows)

    def feature_psi(self) -> dict[str, float]:
        self.flush()
        with self._lock:
            return {n: psi(e, c) for n, e, c in zip(self.names, self._expected, self._counts, strict=True)}

    def score_psi(self) -> float:
        self.flush()
        with self._lock:
            return psi(self._score_expected, self._score_counts)


def psi_by_day(reference: dict[str, Any], days: Sequence[str], columns: dict[str, ArrayLike],
               threshold: float = DEFAULT_THRESHOLD) -> dict[str, dict[str, Any]]:
    """Per day (``days``: one label per row), the PSI of each column against the reference profile
    (columns it has no profile for are skipped) and the columns past ``threshold`` (``flagged``)."""
    labels = np.asarray(days)
    names = [n for n in columns if n in reference]
    values = {n: np.asarray(columns[n], dtype=np.float64) for n in names}
    out: dict[str, dict[str, Any]] = {}
    for day in sorted(set(labels.tolist())):
        mask = labels == day
        row: dict[str, Any] = {n: round(psi_of(reference, n, values[n][mask]), 4) for n in names}
        row["flagged"] = [n for n in names if row[n] > threshold]
        out[str(day)] = row
    return out
