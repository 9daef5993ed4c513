"""The batch path: the features of every payment of a frame, and entity states, vectorised.

Payments frames are normalised (:func:`normalise_handbook`: ``transaction_id``, ``customer_id``,
``terminal_id``, ``amount``, ``timestamp``, ``is_fraud`` with -1 = label not known yet) and sorted
by timestamp. The windows (see ``definitions``) are continuous time: a payment at ``t`` counts in
a window ``(t - w, t]``. Their bounds come from one ``searchsorted`` per window over the payments
sorted by (entity, time) (:class:`_Groups`), their sums from cumulative sums.

:func:`payments_features` computes each payment's windows *with* it (``hi`` = its own position
+ 1) and :func:`entity_states` each entity's windows at ``as_of`` (every payment up to then);
the online path adds the payment to the latter, so both reach the same aggregates and call the
same derivation (``definitions._derive``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scoring_service.core.features.definitions import (
    CUSTOMER_FRAUD_WINDOW,
    CUSTOMER_WINDOWS,
    FEATURE_NAMES,
    FEATURE_WINDOW_DAYS,
    LABEL_DELAY_DAYS,
    N_FEATURES,
    TERMINAL_WINDOWS,
    derive_columns,
)
from scoring_service.core.features.state import cold_customer_aggregates, customer_state_columns, terminal_state_columns

Columns = dict[str, np.ndarray]
_DAY_US = 86400 * 10**6


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


# ----------------------------------------------------------------------------------------------
# window machinery
# ----------------------------------------------------------------------------------------------
def _to_us(ts: Any) -> np.ndarray:
    return np.asarray(ts, dtype="datetime64[ns]").view("int64") // 1000


def _to_seconds(us: np.ndarray) -> np.ndarray:
    return us.astype(np.float64) / 1e6


def _window_us(days: float) -> int:
    return int(round(days * 86400.0 * 1e6))


class _Groups:
    """Payments sorted by (entity, time); window bounds by one searchsorted on a composite key.

    The key is ``code * span + (t - t0)`` in int64 when it fits (it does for millions of
    entities over a year), else a complex (code, t) key (lexicographic order, slower).
    """

    _PAD_US = 400 * _DAY_US  # queries reach at most this far before the first payment

    def __init__(self, codes: np.ndarray, t_us: np.ndarray) -> None:
        self.order = np.argsort(codes, kind="stable")  # input is time-sorted -> (code, time, row)
        self.codes = codes[self.order]
        self.t_us = t_us[self.order]
        n_codes = int(self.codes.max()) + 1 if len(codes) else 1
        self.t0 = int(t_us.min()) - self._PAD_US if len(t_us) else 0
        self.span = (int(t_us.max()) - self.t0 + 1) if len(t_us) else 1
        self.int_keys = n_codes * self.span < 2**62
        self.keys = self._key(self.codes, self.t_us)

    def _key(self, codes: np.ndarray, x_us: np.ndarray) -> np.ndarray:
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


def _first_last(
    cf: np.ndarray, t_sorted_s: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Time of the first / last fraud among sorted rows [lo, hi) (-1 if none), the rows from the
    first fraud on (it included) and the rows after the last one."""
    has = cf[hi] > cf[lo]
    first_idx = np.searchsorted(cf, cf[lo] + 0.5, side="left") - 1
    last_idx = np.searchsorted(cf, cf[hi] - 0.5, side="left") - 1
    n = len(t_sorted_s)
    first = np.where(has, t_sorted_s[np.clip(first_idx, 0, max(n - 1, 0))] if n else 0.0, -1.0)
    last = np.where(has, t_sorted_s[np.clip(last_idx, 0, max(n - 1, 0))] if n else 0.0, -1.0)
    n_since_first = np.where(has, hi - first_idx, 0).astype(np.float64)
    n_after_last = np.where(has, hi - last_idx - 1, 0).astype(np.float64)
    return first, last, n_since_first, n_after_last


def _customer_aggregates(
    g: _Groups, amount: np.ndarray, fraud: np.ndarray, q_codes: np.ndarray, q_us: np.ndarray, hi: np.ndarray
) -> tuple[Columns, np.ndarray]:
    """Customer windows ending at ``q_us`` over sorted rows up to ``hi`` (exclusive), and the
    lower bound of the longest window (for ``mx30``, which the callers add)."""
    d_us = _window_us(LABEL_DELAY_DAYS)
    ca = g.cum(amount)
    c: Columns = {}
    lo_longest = hi
    for w in CUSTOMER_WINDOWS:
        lo = g.count_le(q_codes, q_us - _window_us(w))
        c[f"n{w}"] = (hi - lo).astype(np.float64)
        c[f"s{w}"] = ca[hi] - ca[lo]
        if w == FEATURE_WINDOW_DAYS:
            lo_longest = lo
    cq = g.cum(np.asarray(amount, dtype=np.float64) ** 2)
    c["q30"] = cq[hi] - cq[lo_longest]
    cf = g.cum(fraud)
    khi = g.count_le(q_codes, q_us - d_us)
    klo = g.count_le(q_codes, q_us - d_us - _window_us(CUSTOMER_FRAUD_WINDOW))
    c["kf"] = cf[khi] - cf[klo]
    return c, lo_longest


def _terminal_aggregates(g: _Groups, fraud: np.ndarray, q_codes: np.ndarray, q_us: np.ndarray, t_sorted_s: np.ndarray) -> Columns:
    """Terminal label windows ending ``LABEL_DELAY_DAYS`` before ``q_us``."""
    d_us = _window_us(LABEL_DELAY_DAYS)
    cf = g.cum(fraud)
    hi = g.count_le(q_codes, q_us - d_us)
    tm: Columns = {}
    lo_max = hi
    for w in TERMINAL_WINDOWS:
        lo = g.count_le(q_codes, q_us - d_us - _window_us(w))
        tm[f"n{w}"] = (hi - lo).astype(np.float64)
        tm[f"f{w}"] = cf[hi] - cf[lo]
        if w == max(TERMINAL_WINDOWS):
            lo_max = lo
    tm["first"], tm["last"], tm["nsf"], tm["nal"] = _first_last(cf, t_sorted_s, lo_max, hi)
    return tm


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv, uniq = pd.factorize(values)
    return np.asarray(uniq), inv.astype(np.int64)


def _batch_aggregates(payments: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, Columns, Columns]:
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
    c, lo30 = _customer_aggregates(g, amount, fraud, g.codes, g.t_us, hi)
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


def _features_frame(values: np.ndarray, payments: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(values, columns=FEATURE_NAMES, index=payments.index)


def payments_features(payments: pd.DataFrame) -> pd.DataFrame:
    """One row per payment (same index), columns FEATURE_NAMES, float32.

    ``payments`` must be sorted by timestamp (as ``normalise_handbook`` returns it).
    """
    if len(payments) == 0:
        return _features_frame(np.empty((0, N_FEATURES), dtype=np.float32), payments)
    amount, t_s, c, tm = _batch_aggregates(payments)
    return _features_frame(derive_columns(amount, t_s, c, tm), payments)


def payments_features_cold_customer(payments: pd.DataFrame) -> pd.DataFrame:
    """Features of the same payments as if each customer were unseen (``online_features`` with
    ``customer_state=None``); terminals keep their history. Used to teach the model the
    cold-start case that the online path meets for new cards."""
    if len(payments) == 0:
        return _features_frame(np.empty((0, N_FEATURES), dtype=np.float32), payments)
    amount, t_s, _, tm = _batch_aggregates(payments)
    return _features_frame(derive_columns(amount, t_s, cold_customer_aggregates(amount), tm), payments)


def handbook_features(payments: pd.DataFrame) -> pd.DataFrame:
    """The handbook's 15 features only (for reproducing its published baseline)."""
    return payments_features(payments)[FEATURE_NAMES[:15]]


# ----------------------------------------------------------------------------------------------
# entity states (for the cache and for online scoring)
# ----------------------------------------------------------------------------------------------
def _as_of_us(as_of: Any) -> int:
    if isinstance(as_of, (float, int)) and not isinstance(as_of, bool):
        return int(round(float(as_of) * 1e6))
    ts = pd.Timestamp(as_of)
    if ts.tzinfo is not None:
        ts = ts.tz_convert(None)
    return int(ts.value // 1000)


def _state_dicts(ids: np.ndarray, cols: Columns) -> dict[str, dict[str, float]]:
    names = list(cols)
    mat = np.column_stack([cols[k] for k in names]).tolist()
    return {eid: dict(zip(names, row, strict=True)) for eid, row in zip(ids.tolist(), mat, strict=True)}


def entity_states(payments: pd.DataFrame, as_of: Any) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(customer_states, terminal_states) as of ``as_of`` (payments with timestamp <= as_of).

    ``as_of``: a time ``pd.Timestamp`` reads (aware = converted to UTC), or epoch seconds.
    Every customer with a payment in the ``FEATURE_WINDOW_DAYS`` up to ``as_of`` and every
    terminal with a payment in the ``LABEL_DELAY_DAYS + 30`` days up to ``as_of`` gets an entry
    (keys: ``state.CustomerState``, ``state.TerminalState``). The current payment of a later
    request is *not* in these; ``online_features`` adds it.
    """
    a_us = _as_of_us(as_of)
    t_all = _to_us(payments["timestamp"].to_numpy())
    longest_c = FEATURE_WINDOW_DAYS * _DAY_US
    longest_t = (max(TERMINAL_WINDOWS) + LABEL_DELAY_DAYS) * _DAY_US
    lo_t = a_us - max(longest_c, longest_t)
    # the customer's known frauds reach back d + 30 days as well
    lo_t = min(lo_t, a_us - (LABEL_DELAY_DAYS + CUSTOMER_FRAUD_WINDOW) * _DAY_US)
    sel = (t_all > lo_t) & (t_all <= a_us)
    p = payments.loc[sel] if not sel.all() else payments
    t_us = t_all[sel]
    amount = p["amount"].to_numpy(dtype=np.float64)
    fraud = _fraud_flags(p)
    if len(p) == 0:
        return {}, {}

    # customers: one query per customer, at as_of
    cids, ccodes = _codes(p["customer_id"].to_numpy())
    g = _Groups(ccodes, t_us)
    q_codes = np.arange(len(cids), dtype=np.int64)
    q_us = np.full(len(cids), a_us, dtype=np.int64)
    hi = g.count_le(q_codes, q_us)
    c, lo30 = _customer_aggregates(g, amount, fraud, q_codes, q_us, hi)
    c["mx30"] = _range_max(amount[g.order], lo30, hi)
    last_ts = _to_seconds(g.t_us)[np.clip(hi - 1, 0, None)]
    keep = np.flatnonzero(c["n30"] > 0)
    cols = customer_state_columns(c, last_ts)
    cust_states = _state_dicts(cids[keep], {k: v[keep] for k, v in cols.items()})

    # terminals
    tids, tcodes = _codes(p["terminal_id"].to_numpy())
    gt = _Groups(tcodes, t_us)
    q_codes = np.arange(len(tids), dtype=np.int64)
    q_us = np.full(len(tids), a_us, dtype=np.int64)
    tm = _terminal_aggregates(gt, fraud, q_codes, q_us, _to_seconds(gt.t_us))
    thi = gt.count_le(q_codes, q_us)
    tlast = _to_seconds(gt.t_us)[np.clip(thi - 1, 0, None)]
    term_states = _state_dicts(tids, terminal_state_columns(tm, tlast))
    return cust_states, term_states
