"""What the features are: the windows, the names, the time convention, and the ONE derivation.

Time
    Every timestamp becomes float *seconds since the Unix epoch* through whole microseconds
    (:func:`epoch_seconds` online, ``batch._to_seconds`` on columns), the same way in both paths,
    so calendar features and "days since" features agree bit for bit between batch and online.

Windows (continuous time, as in the handbook's ``rolling('Nd')``; ``d`` = ``LABEL_DELAY_DAYS``)
    * customer windows ``CUSTOMER_WINDOWS`` (1, 7, 30 days): the customer's payments with
      ``t - w < t_j <= t``, *including the current payment* (ties: payments earlier in the
      time-sorted frame count).
    * terminal label windows ``TERMINAL_WINDOWS`` (1, 7, 14, 30 days), shifted by the label delay:
      the terminal's payments with ``t - d - w < t_j <= t - d``; only their labels are used (no
      leakage).
    * the customer's known frauds: its frauds with ``t - d - CUSTOMER_FRAUD_WINDOW < t_j <= t - d``.

Parity
    :func:`_derive` turns raw window aggregates into the feature vector. The batch path
    (``batch.payments_features``) calls it on whole columns with NumPy helpers; the online path
    (``online.online_features``) calls it on the floats of one payment with ``math`` helpers.
    One definition of every derived feature, two callers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import pandas as pd

LABEL_DELAY_DAYS = 7  # a payment's label is known this many days after it
CUSTOMER_WINDOWS: tuple[int, ...] = (1, 7, 30)
TERMINAL_WINDOWS: tuple[int, ...] = (1, 7, 14, 30)  # before the label delay
CUSTOMER_FRAUD_WINDOW = 30  # the customer's known frauds, before the label delay
# The longest feature window (days). The windows of labels (terminals, the customer's known
# frauds) are no longer, but end LABEL_DELAY_DAYS before the payment: a job computing entity
# states needs the payments of the last FEATURE_WINDOW_DAYS + LABEL_DELAY_DAYS days.
FEATURE_WINDOW_DAYS = max(CUSTOMER_WINDOWS)

_DAY = 86400.0
_NO_FRAUD_DAYS = 60.0  # "days since the known fraud" when there is none

FEATURE_NAMES: list[str] = [
    # handbook features
    "amount",
    "is_weekend",
    "is_night",
    *[f"customer_nb_tx_{w}d" for w in CUSTOMER_WINDOWS],
    *[f"customer_avg_amount_{w}d" for w in CUSTOMER_WINDOWS],
    *[f"terminal_nb_tx_{w}d" for w in (1, 7, 30)],
    *[f"terminal_risk_{w}d" for w in (1, 7, 30)],
    # additions
    "amount_ratio_avg_30d",  # amount / the customer's average of the previous payments (30 d)
    "amount_ratio_avg_7d",
    "amount_z_30d",  # (amount - mean) / (std + 1) of the customer's previous payments (30 d)
    "amount_ratio_max_30d",  # amount / max of the customer's previous payments (30 d)
    "customer_nb_fraud_known_30d",
    "terminal_risk_14d",
    "terminal_nb_fraud_30d",
    "terminal_days_since_last_fraud",
    "terminal_days_since_first_fraud",
    "terminal_risk_since_first_fraud",  # frauds / labelled payments since the first known fraud
    "terminal_nb_tx_after_last_fraud",  # labelled payments after the last known fraud (-1: none)
]
N_FEATURES = len(FEATURE_NAMES)

_EPOCH = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)


def epoch_seconds(timestamp: Any) -> float:
    """Canonical float epoch seconds of one timestamp (float, ISO string, datetime, pd.Timestamp,
    np.datetime64), truncated to the microsecond; a naive time means UTC. A string of digits is
    epoch seconds. Raises ValueError for a string that is not a time."""
    if isinstance(timestamp, (float, int)) and not isinstance(timestamp, bool):
        return float(timestamp)
    if isinstance(timestamp, str):
        if timestamp.replace(".", "", 1).isdigit():
            return float(timestamp)
        timestamp = pd.Timestamp(timestamp)
        if timestamp is pd.NaT:  # "", "NaT"
            raise ValueError("not a time")
    if isinstance(timestamp, pd.Timestamp):
        return float(timestamp.value // 1000) / 1e6  # .value is UTC for aware timestamps
    if isinstance(timestamp, datetime):
        offset = timestamp.utcoffset()
        if offset is not None:
            timestamp = timestamp.replace(tzinfo=None) - offset
        return float((timestamp - _EPOCH) // _US) / 1e6
    if isinstance(timestamp, np.datetime64):
        return float(timestamp.astype("datetime64[ns]").astype("int64") // 1000) / 1e6
    return float(timestamp)


# ----------------------------------------------------------------------------------------------
# the single definition of the derived features (arrays in batch, floats online)
# ----------------------------------------------------------------------------------------------
# A value of ``_derive``: one float (online) or one column (batch).
V = TypeVar("V", float, np.ndarray)


def _div_np(x: np.ndarray, y: np.ndarray, default: np.ndarray | float) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    ok = y > 0
    return np.where(ok, np.asarray(x, dtype=np.float64) / np.where(ok, y, 1.0), default)


def _div_py(x: float, y: float, default: float) -> float:
    return x / y if y > 0 else default


def _sqrt_pos_np(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(x, 0.0))


def _sqrt_pos_py(x: float) -> float:
    return math.sqrt(x) if x > 0 else 0.0


def _min_np(x: np.ndarray, c: float) -> np.ndarray:
    return np.minimum(x, c)


def _min_py(x: float, c: float) -> float:
    return min(x, c)


def _derive(
    a: V,
    t: V,
    c: Mapping[str, V],
    tm: Mapping[str, V],
    div: Callable[[V, V, Any], V],
    sqrt_pos: Callable[[V], V],
    cap: Callable[[V, float], V],
) -> list[V]:
    """The FEATURE_NAMES columns from the amount ``a``, the time ``t`` (epoch seconds) and raw
    window aggregates ``c``/``tm`` (all floats, or all columns of the same length).

    Customer aggregates ``c`` *include* the current payment: ``n{w} s{w}`` (count, sum of
    amounts) for w in 1, 7, 30, ``q30`` (sum of squares), ``mx30`` (max of the previous payments,
    0 if none), ``kf`` (known frauds). Terminal ``tm``: ``n{w}``, ``f{w}`` (labelled payments,
    frauds) per delayed window, ``first``/``last`` fraud time (-1 = none), ``nsf``/``nal``
    (payments since the first fraud, it included / after the last). ``state`` maps entity states
    to these. ``div(x, y, default)`` is ``x / y`` where ``y > 0``, else ``default``.
    """
    day = (t // _DAY) + 3.0  # 1970-01-01 was a Thursday (Monday = 0)
    weekday = day - 7.0 * (day // 7.0)
    hour = (t - _DAY * (t // _DAY)) // 3600.0
    n30p = c["n30"] - 1.0
    s30p = c["s30"] - a
    mean30p = div(s30p, n30p, a)
    var30p = div(c["q30"] - a * a - div(s30p * s30p, n30p, 0.0), n30p - 1.0, 0.0)
    mean7p = div(c["s7"] - a, c["n7"] - 1.0, a)
    has_first = (tm["first"] >= 0) * 1.0
    has_last = (tm["last"] >= 0) * 1.0
    return [
        a,
        (weekday >= 5.0) * 1.0,
        (hour <= 6.0) * 1.0,
        c["n1"],
        c["n7"],
        c["n30"],
        c["s1"] / c["n1"],
        c["s7"] / c["n7"],
        c["s30"] / c["n30"],
        tm["n1"],
        tm["n7"],
        tm["n30"],
        div(tm["f1"], tm["n1"], 0.0),
        div(tm["f7"], tm["n7"], 0.0),
        div(tm["f30"], tm["n30"], 0.0),
        div(a, mean30p, 1.0),
        div(a, mean7p, 1.0),
        (a - mean30p) / (sqrt_pos(var30p) + 1.0),
        div(a, c["mx30"], 1.0),
        c["kf"],
        div(tm["f14"], tm["n14"], 0.0),
        tm["f30"],
        has_last * cap((t - tm["last"]) / _DAY, _NO_FRAUD_DAYS) + (1.0 - has_last) * _NO_FRAUD_DAYS,
        has_first * cap((t - tm["first"]) / _DAY, _NO_FRAUD_DAYS) + (1.0 - has_first) * _NO_FRAUD_DAYS,
        div(tm["f30"], tm["nsf"], 0.0),
        has_last * tm["nal"] - (1.0 - has_last),
    ]


def derive_columns(a: np.ndarray, t: np.ndarray, c: Mapping[str, np.ndarray], tm: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n, N_FEATURES) float32 features of n payments (batch caller of :func:`_derive`)."""
    cols = _derive(a, t, c, tm, _div_np, _sqrt_pos_np, _min_np)
    out = np.empty((len(a), N_FEATURES), dtype=np.float32)
    for j, col in enumerate(cols):
        out[:, j] = col
    return out


def derive_row(a: float, t: float, c: Mapping[str, float], tm: Mapping[str, float]) -> list[float]:
    """The features of one payment as Python floats (online caller of :func:`_derive`)."""
    return _derive(a, t, c, tm, _div_py, _sqrt_pos_py, _min_py)
