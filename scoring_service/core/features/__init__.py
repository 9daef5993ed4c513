"""The one feature module: training, the nightly batch and the online path all use it.

Time
    Every timestamp is turned into float *seconds since the Unix epoch* through whole
    microseconds (``_to_seconds`` / ``epoch_seconds``), the same way in both paths, so calendar
    features and "days since" features agree bit for bit between batch and online.

Windows (continuous time, as in the handbook's ``rolling('Nd')``)
    * customer windows of 1, 7, 30 days: the customer's payments with ``t - w < t_j <= t``,
      *including the current payment* (ties: payments earlier in the time-sorted frame count).
    * terminal label windows of 1, 7, 14, 30 days, shifted by ``LABEL_DELAY_DAYS``: payments of
      the terminal with ``t - d - w < t_j <= t - d``; only their labels are used (no leakage).
    * the customer's known frauds: its frauds with ``t - d - 30 < t_j <= t - d``.

Parity
    ``entity_states(payments, as_of=t)`` gives exactly the aggregates of those windows with the
    current payment left out; ``online_features`` adds the payment and calls the same derivation
    function (:func:`_derive`) that :func:`payments_features` calls on whole columns. One
    definition of every derived feature, two callers.

Entity state keys (plain floats, JSON-serialisable; timestamps are epoch seconds, -1 = none)
    customer: ``nb_tx_{w}d``, ``sum_amount_{w}d`` for w in 1, 7, 30; ``sumsq_amount_30d``;
    ``max_amount_30d`` (0 when none); ``avg_amount_30d`` (the customer's usual amount, 0 when no
    payment); ``nb_fraud_known_30d``; ``last_ts``.
    terminal: ``nb_tx_{w}d_delayed``, ``nb_fraud_{w}d_delayed`` for w in 1, 7, 14, 30;
    ``first_fraud_ts_delayed`` / ``last_fraud_ts_delayed`` (first / last known fraud in the
    30-day delayed window, -1 = none); ``nb_tx_since_first_fraud_delayed`` (labelled payments from
    that first fraud on, it included) and ``nb_tx_after_last_fraud_delayed``; ``last_ts``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

LABEL_DELAY_DAYS = 7
CUSTOMER_WINDOWS = (1, 7, 30)
TERMINAL_WINDOWS = (1, 7, 14, 30)
CUSTOMER_FRAUD_WINDOW = 30
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


# ----------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------
def normalise_handbook(df: pd.DataFrame) -> pd.DataFrame:
    """Handbook / simulator columns -> the normalised payments frame, sorted by timestamp."""
    out = pd.DataFrame(
        {
            "transaction_id": df["TRANSACTION_ID"].astype(str).to_numpy(),
            "customer_id": df["CUSTOMER_ID"].astype(str).to_numpy(),
            "terminal_id": df["TERMINAL_ID"].astype(str).to_numpy(),
            "amount": df["TX_AMOUNT"].astype("float64").to_numpy(),
            "timestamp": pd.to_datetime(df["TX_DATETIME"]).astype("datetime64[ns]").to_numpy(),
        }
    )
    if "TX_FRAUD" in df.columns:
        out["is_fraud"] = df["TX_FRAUD"].fillna(-1).astype("int8").to_numpy()
    order = np.argsort(out["timestamp"].to_numpy(), kind="stable")
    return out.iloc[order].reset_index(drop=True)


def load_payments(path) -> pd.DataFrame:
    """Handbook-format parquet -> normalised payments frame."""
    return normalise_handbook(pd.read_parquet(Path(path)))


# ----------------------------------------------------------------------------------------------
# the single definition of the derived features (arrays in batch, floats online)
# ----------------------------------------------------------------------------------------------
def _div_np(x, y, default):
    y = np.asarray(y, dtype=np.float64)
    ok = y > 0
    return np.where(ok, np.asarray(x, dtype=np.float64) / np.where(ok, y, 1.0), default)


def _div_py(x, y, default):
    return x / y if y > 0 else default


def _sqrt_pos_np(x):
    return np.sqrt(np.maximum(x, 0.0))


def _sqrt_pos_py(x):
    return math.sqrt(x) if x > 0 else 0.0


def _min_np(x, c):
    return np.minimum(x, c)


def _derive(a, t, c, tm, div, sqrt_pos, cap):
    """Features from raw window aggregates; ``c``/``tm`` map names to arrays or floats.

    Customer aggregates ``c`` *include* the current payment: ``n1 s1 n7 s7 n30 s30 q30`` (count,
    sum, sum of squares), ``mx30`` (max of the previous payments, 0 if none), ``kf`` (known
    frauds). Terminal ``tm``: ``n{w}``, ``f{w}`` per delayed window, ``first``/``last`` fraud ts.
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


def _derive_batch(a, t, c, tm) -> np.ndarray:
    cols = _derive(a, t, c, tm, _div_np, _sqrt_pos_np, _min_np)
    n = len(a)
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    for j, col in enumerate(cols):
        out[:, j] = col
    return out


# ----------------------------------------------------------------------------------------------
# batch window machinery
# ----------------------------------------------------------------------------------------------
def _to_us(ts) -> np.ndarray:
    return np.asarray(ts, dtype="datetime64[ns]").view("int64") // 1000


def _to_seconds(us: np.ndarray) -> np.ndarray:
    return us.astype(np.float64) / 1e6


def epoch_seconds(timestamp) -> float:
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
        if timestamp.tzinfo is not None:
            timestamp = timestamp.replace(tzinfo=None) - timestamp.utcoffset()
        return float((timestamp - _EPOCH) // _US) / 1e6
    if isinstance(timestamp, np.datetime64):
        return float(np.datetime64(timestamp, "ns").astype("int64") // 1000) / 1e6
    return float(timestamp)


class _Groups:
    """Payments sorted by (entity, time); window bounds by one searchsorted on a composite key.

    The key is ``code * span + (t - t0)`` in int64 when it fits (it does for millions of
    entities over a year), else a complex (code, t) key (lexicographic order, slower).
    """

    _PAD_US = 400 * 86400 * 10**6  # queries reach at most this far before the first payment

    def __init__(self, codes: np.ndarray, t_us: np.ndarray):
        self.order = np.argsort(codes, kind="stable")  # input is time-sorted -> (code, time, row)
        self.codes = codes[self.order]
        self.t_us = t_us[self.order]
        n_codes = int(self.codes.max()) + 1 if len(codes) else 1
        self.t0 = int(t_us.min()) - self._PAD_US if len(t_us) else 0
        self.span = (int(t_us.max()) - self.t0 + 1) if len(t_us) else 1
        self.int_keys = n_codes * self.span < 2**62
        self.keys = self._key(self.codes, self.t_us)

    def _key(self, codes, x_us):
        if self.int_keys:
            return codes.astype(np.int64) * self.span + np.clip(x_us - self.t0, 0, self.span - 1)
        return codes.astype(np.float64) + 1j * x_us.astype(np.float64)

    def count_le(self, codes: np.ndarray, x_us: np.ndarray) -> np.ndarray:
        """Positions (in sorted order) just after the last row with (code, t) <= (codes, x_us)."""
        return np.searchsorted(self.keys, self._key(codes, x_us), side="right")

    def cum(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)[self.order]
        out = np.empty(len(v) + 1, dtype=np.float64)
        out[0] = 0.0
        np.cumsum(v, out=out[1:])
        return out


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo:hi]) per query (0 for empty ranges), sparse table, vectorised."""
    res = np.zeros(len(lo), dtype=np.float64)
    length = hi - lo
    ok = length > 0
    if not ok.any() or len(values) == 0:
        return res
    lo, hi, length = lo[ok], hi[ok], length[ok]
    k = np.floor(np.log2(length)).astype(np.int64)
    levels = [np.asarray(values, dtype=np.float64)]
    for j in range(1, int(k.max()) + 1):
        prev = levels[-1]
        step = 1 << (j - 1)
        levels.append(np.maximum(prev[:-step], prev[step:]) if len(prev) > step else prev[:0])
    out = np.empty(len(lo), dtype=np.float64)
    for j in np.unique(k):
        m = k == j
        lev = levels[j]
        out[m] = np.maximum(lev[lo[m]], lev[hi[m] - (1 << j)])
    res[ok] = out
    return res


def _fraud_flags(payments: pd.DataFrame) -> np.ndarray:
    if "is_fraud" in payments.columns:
        return (payments["is_fraud"].to_numpy() == 1).astype(np.float64)
    return np.zeros(len(payments), dtype=np.float64)


def _first_last(cf: np.ndarray, t_sorted_s: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Time of the first / last fraud among sorted rows [lo, hi) (-1 if none)."""
    has = cf[hi] > cf[lo]
    first_idx = np.searchsorted(cf, cf[lo] + 0.5, side="left") - 1
    last_idx = np.searchsorted(cf, cf[hi] - 0.5, side="left") - 1
    n = len(t_sorted_s)
    first = np.where(has, t_sorted_s[np.clip(first_idx, 0, max(n - 1, 0))] if n else 0.0, -1.0)
    last = np.where(has, t_sorted_s[np.clip(last_idx, 0, max(n - 1, 0))] if n else 0.0, -1.0)
    n_since_first = np.where(has, hi - first_idx, 0).astype(np.float64)
    n_after_last = np.where(has, hi - last_idx - 1, 0).astype(np.float64)
    return first, last, n_since_first, n_after_last


def _customer_aggregates(g: _Groups, amount, fraud, q_codes, q_us, hi, t_sorted_s):
    """Customer windows ending at q_us, rows up to sorted position ``hi`` (exclusive)."""
    w_us = lambda w: int(round(w * _DAY * 1e6))  # noqa: E731
    d_us = w_us(LABEL_DELAY_DAYS)
    ca = g.cum(amount)
    c = {}
    for w in CUSTOMER_WINDOWS:
        lo = g.count_le(q_codes, q_us - w_us(w))
        c[f"n{w}"] = (hi - lo).astype(np.float64)
        c[f"s{w}"] = ca[hi] - ca[lo]
        if w == 30:
            lo30 = lo
    cq = g.cum(np.asarray(amount, dtype=np.float64) ** 2)
    c["q30"] = cq[hi] - cq[lo30]
    cf = g.cum(fraud)
    khi = g.count_le(q_codes, q_us - d_us)
    klo = g.count_le(q_codes, q_us - d_us - w_us(CUSTOMER_FRAUD_WINDOW))
    c["kf"] = cf[khi] - cf[klo]
    return c, lo30, ca


def _terminal_aggregates(g: _Groups, fraud, q_codes, q_us, t_sorted_s):
    w_us = lambda w: int(round(w * _DAY * 1e6))  # noqa: E731
    d_us = w_us(LABEL_DELAY_DAYS)
    cf = g.cum(fraud)
    hi = g.count_le(q_codes, q_us - d_us)
    tm = {}
    for w in TERMINAL_WINDOWS:
        lo = g.count_le(q_codes, q_us - d_us - w_us(w))
        tm[f"n{w}"] = (hi - lo).astype(np.float64)
        tm[f"f{w}"] = cf[hi] - cf[lo]
        if w == max(TERMINAL_WINDOWS):
            lo_max = lo
    tm["first"], tm["last"], tm["nsf"], tm["nal"] = _first_last(cf, t_sorted_s, lo_max, hi)
    return tm


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv, uniq = pd.factorize(values)
    return np.asarray(uniq), inv.astype(np.int64)


def _batch_aggregates(payments: pd.DataFrame):
    """(amount, t_seconds, customer aggregates, terminal aggregates), rows in frame order."""
    n = len(payments)
    t_us = _to_us(payments["timestamp"].to_numpy())
    if np.any(np.diff(t_us) < 0):
        raise ValueError("payments must be sorted by timestamp")
    amount = payments["amount"].to_numpy(dtype=np.float64)
    fraud = _fraud_flags(payments)
    t_s = _to_seconds(t_us)

    # customers (queries in group order: searchsorted is much faster on sorted queries)
    _, ccodes = _codes(payments["customer_id"].to_numpy())
    g = _Groups(ccodes, t_us)
    hi = np.arange(1, n + 1)  # the current payment and every earlier one in group order
    c, lo30, _ = _customer_aggregates(g, amount, fraud, g.codes, g.t_us, hi, None)
    c["mx30"] = _range_max(amount[g.order], lo30, hi - 1)  # previous payments only
    inv = np.empty(n, dtype=np.int64)
    inv[g.order] = np.arange(n)
    c = {k: v[inv] for k, v in c.items()}

    # terminals
    _, tcodes = _codes(payments["terminal_id"].to_numpy())
    gt = _Groups(tcodes, t_us)
    tm = _terminal_aggregates(gt, fraud, gt.codes, gt.t_us, _to_seconds(gt.t_us))
    inv[gt.order] = np.arange(n)
    tm = {k: v[inv] for k, v in tm.items()}
    return amount, t_s, c, tm


def _cold_customer(amount: np.ndarray) -> dict:
    """Customer aggregates of an unseen customer: its windows hold only the current payment."""
    one = np.ones_like(amount)
    zero = np.zeros_like(amount)
    return {"n1": one, "s1": amount, "n7": one, "s7": amount, "n30": one, "s30": amount, "q30": amount * amount,
            "mx30": zero, "kf": zero}


def payments_features(payments: pd.DataFrame) -> pd.DataFrame:
    """One row per payment (same index), columns FEATURE_NAMES, float32.

    ``payments`` must be sorted by timestamp (as ``normalise_handbook`` returns it).
    """
    if len(payments) == 0:
        return pd.DataFrame(np.empty((0, N_FEATURES), dtype=np.float32), columns=FEATURE_NAMES, index=payments.index)
    amount, t_s, c, tm = _batch_aggregates(payments)
    return pd.DataFrame(_derive_batch(amount, t_s, c, tm), columns=FEATURE_NAMES, index=payments.index)


def payments_features_cold_customer(payments: pd.DataFrame) -> pd.DataFrame:
    """Features of the same payments as if each customer were unseen (``online_features`` with
    ``customer_state=None``); terminals keep their history. Used to teach the model the
    cold-start case that the online path meets for new cards."""
    if len(payments) == 0:
        return pd.DataFrame(np.empty((0, N_FEATURES), dtype=np.float32), columns=FEATURE_NAMES, index=payments.index)
    amount, t_s, _, tm = _batch_aggregates(payments)
    return pd.DataFrame(_derive_batch(amount, t_s, _cold_customer(amount), tm), columns=FEATURE_NAMES, index=payments.index)


# ----------------------------------------------------------------------------------------------
# entity states (for the cache and for online scoring)
# ----------------------------------------------------------------------------------------------
def _as_of_us(as_of) -> int:
    if isinstance(as_of, (float, int)) and not isinstance(as_of, bool):
        return int(round(float(as_of) * 1e6))
    ts = pd.Timestamp(as_of)
    if ts.tzinfo is not None:
        ts = ts.tz_convert(None)
    return int(ts.value // 1000)


def entity_states(payments: pd.DataFrame, as_of: pd.Timestamp) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(customer_states, terminal_states) as of ``as_of`` (payments with timestamp <= as_of).

    Every customer with a payment in the 30 days up to ``as_of`` and every terminal with a
    payment in the ``LABEL_DELAY_DAYS + 30`` days up to ``as_of`` gets an entry (keys: see the
    module docstring). The current payment of a later request is *not* in these; online_features
    adds it.
    """
    a_us = _as_of_us(as_of)
    t_all = _to_us(payments["timestamp"].to_numpy())
    longest_c = max(CUSTOMER_WINDOWS) * 86400 * 10**6
    longest_t = (max(TERMINAL_WINDOWS) + LABEL_DELAY_DAYS) * 86400 * 10**6
    lo_t = a_us - max(longest_c, longest_t + 0)
    # the customer's known frauds reach back d + 30 days as well
    lo_t = min(lo_t, a_us - (LABEL_DELAY_DAYS + CUSTOMER_FRAUD_WINDOW) * 86400 * 10**6)
    sel = (t_all > lo_t) & (t_all <= a_us)
    p = payments.loc[sel] if not sel.all() else payments
    t_us = t_all[sel]
    amount = p["amount"].to_numpy(dtype=np.float64)
    fraud = _fraud_flags(p)
    cust_states: dict[str, dict[str, float]] = {}
    term_states: dict[str, dict[str, float]] = {}
    if len(p) == 0:
        return cust_states, term_states

    # customers
    cids, ccodes = _codes(p["customer_id"].to_numpy())
    g = _Groups(ccodes, t_us)
    q_codes = np.arange(len(cids), dtype=np.int64)
    q_us = np.full(len(cids), a_us, dtype=np.int64)
    hi = g.count_le(q_codes, q_us)
    c, lo30, _ = _customer_aggregates(g, amount, fraud, q_codes, q_us, hi, _to_seconds(g.t_us))
    mx = _range_max(amount[g.order], lo30, hi)
    last_idx = hi - 1
    last_ts = _to_seconds(g.t_us)[np.clip(last_idx, 0, None)]
    keep = np.flatnonzero(c["n30"] > 0)
    cols = {
        "nb_tx_1d": c["n1"], "sum_amount_1d": c["s1"],
        "nb_tx_7d": c["n7"], "sum_amount_7d": c["s7"],
        "nb_tx_30d": c["n30"], "sum_amount_30d": c["s30"],
        "sumsq_amount_30d": c["q30"], "max_amount_30d": mx,
        "avg_amount_30d": _div_np(c["s30"], c["n30"], 0.0),
        "nb_fraud_known_30d": c["kf"], "last_ts": last_ts,
    }
    names = list(cols)
    mat = np.column_stack([cols[k] for k in names])[keep].tolist()
    for cid, row in zip(cids[keep].tolist(), mat):
        cust_states[cid] = dict(zip(names, row))

    # terminals
    tids, tcodes = _codes(p["terminal_id"].to_numpy())
    gt = _Groups(tcodes, t_us)
    q_codes = np.arange(len(tids), dtype=np.int64)
    q_us = np.full(len(tids), a_us, dtype=np.int64)
    tm = _terminal_aggregates(gt, fraud, q_codes, q_us, _to_seconds(gt.t_us))
    thi = gt.count_le(q_codes, q_us)
    tlast = _to_seconds(gt.t_us)[np.clip(thi - 1, 0, None)]
    tcols = {}
    for w in TERMINAL_WINDOWS:
        tcols[f"nb_tx_{w}d_delayed"] = tm[f"n{w}"]
        tcols[f"nb_fraud_{w}d_delayed"] = tm[f"f{w}"]
    tcols["first_fraud_ts_delayed"] = tm["first"]
    tcols["last_fraud_ts_delayed"] = tm["last"]
    tcols["nb_tx_since_first_fraud_delayed"] = tm["nsf"]
    tcols["nb_tx_after_last_fraud_delayed"] = tm["nal"]
    tcols["last_ts"] = tlast
    names = list(tcols)
    mat = np.column_stack([tcols[k] for k in names]).tolist()
    for tid, row in zip(tids.tolist(), mat):
        term_states[tid] = dict(zip(names, row))
    return cust_states, term_states


# ----------------------------------------------------------------------------------------------
# online path (pure Python floats)
# ----------------------------------------------------------------------------------------------
_EMPTY_TERMINAL = {"n1": 0.0, "f1": 0.0, "n7": 0.0, "f7": 0.0, "n14": 0.0, "f14": 0.0, "n30": 0.0, "f30": 0.0,
                   "first": -1.0, "last": -1.0, "nsf": 0.0, "nal": 0.0}


def _online_row(amount: float, timestamp, cs: dict | None, ts: dict | None) -> list[float]:
    a = float(amount)
    t = epoch_seconds(timestamp)
    if cs is None:  # as _cold_customer
        c = {"n1": 1.0, "s1": a, "n7": 1.0, "s7": a, "n30": 1.0, "s30": a, "q30": a * a, "mx30": 0.0, "kf": 0.0}
    else:
        c = {
            "n1": cs["nb_tx_1d"] + 1.0, "s1": cs["sum_amount_1d"] + a,
            "n7": cs["nb_tx_7d"] + 1.0, "s7": cs["sum_amount_7d"] + a,
            "n30": cs["nb_tx_30d"] + 1.0, "s30": cs["sum_amount_30d"] + a,
            "q30": cs["sumsq_amount_30d"] + a * a, "mx30": cs["max_amount_30d"],
            "kf": cs["nb_fraud_known_30d"],
        }
    if ts is None:
        tm = _EMPTY_TERMINAL
    else:
        tm = {
            "n1": ts["nb_tx_1d_delayed"], "f1": ts["nb_fraud_1d_delayed"],
            "n7": ts["nb_tx_7d_delayed"], "f7": ts["nb_fraud_7d_delayed"],
            "n14": ts["nb_tx_14d_delayed"], "f14": ts["nb_fraud_14d_delayed"],
            "n30": ts["nb_tx_30d_delayed"], "f30": ts["nb_fraud_30d_delayed"],
            "first": ts["first_fraud_ts_delayed"], "last": ts["last_fraud_ts_delayed"],
            "nsf": ts["nb_tx_since_first_fraud_delayed"], "nal": ts["nb_tx_after_last_fraud_delayed"],
        }
    return _derive(a, t, c, tm, _div_py, _sqrt_pos_py, min)


def online_features(amount: float, timestamp: datetime | float, customer_state: dict | None, terminal_state: dict | None) -> np.ndarray:
    """Features of ONE payment from entity states taken just before it (None = unseen entity)."""
    return np.array(_online_row(amount, timestamp, customer_state, terminal_state), dtype=np.float32)


def online_features_many(rows: Sequence[tuple]) -> np.ndarray:
    """(n, F) float32 features of rows ``(amount, timestamp, customer_state, terminal_state)``."""
    if len(rows) == 0:
        return np.empty((0, N_FEATURES), dtype=np.float32)
    return np.array([_online_row(*r) for r in rows], dtype=np.float32)


def advance_customer_state(state: dict | None, amount: float, timestamp) -> dict:
    """The customer's state after this payment (windows gain it; nothing expires here)."""
    a = float(amount)
    t = epoch_seconds(timestamp)
    if state is None:
        state = {
            "nb_tx_1d": 0.0, "sum_amount_1d": 0.0, "nb_tx_7d": 0.0, "sum_amount_7d": 0.0,
            "nb_tx_30d": 0.0, "sum_amount_30d": 0.0, "sumsq_amount_30d": 0.0, "max_amount_30d": 0.0,
            "avg_amount_30d": 0.0, "nb_fraud_known_30d": 0.0, "last_ts": -1.0,
        }
    s = dict(state)
    for w in CUSTOMER_WINDOWS:
        s[f"nb_tx_{w}d"] = s[f"nb_tx_{w}d"] + 1.0
        s[f"sum_amount_{w}d"] = s[f"sum_amount_{w}d"] + a
    s["sumsq_amount_30d"] = s["sumsq_amount_30d"] + a * a
    s["max_amount_30d"] = max(s["max_amount_30d"], a)
    s["avg_amount_30d"] = s["sum_amount_30d"] / s["nb_tx_30d"]
    s["last_ts"] = max(s.get("last_ts", -1.0), t)
    return s


def handbook_features(payments: pd.DataFrame) -> pd.DataFrame:
    """The handbook's 15 features only (for reproducing its published baseline)."""
    return payments_features(payments)[FEATURE_NAMES[:15]]
