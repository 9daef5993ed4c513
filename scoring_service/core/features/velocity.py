"""Velocity: how many payments a card made in the last hour and day, and how long ago its last one was.

Card testing (a compromised card makes a burst of small payments, then large ones) shows as many
payments in a short time. The daily-window features cannot see it online (the cached state is as
of the nightly run); the intraday list of the card's payments can (``features.intraday``).

Definition (one, two callers: :func:`velocity_of` online, :func:`payments_velocity` in training)
    For a payment at epoch seconds ``t`` and the times ``t_j`` of the card's *previous* payments:

    * ``nb_tx_1h`` / ``nb_tx_1d``: 1 (the payment itself) + the previous payments with
      ``t - w < t_j <= t`` (``w`` from :data:`VELOCITY_WINDOWS_S`, compared in float seconds);
    * ``seconds_since_last``: ``t - max(t_j <= t)``, or -1.0 when the card has no previous payment.

    Previous payments later than ``t`` are ignored. In a payments frame, the previous payments of a
    row are the card's earlier rows (ties in time: earlier rows count, as in the batch features).

Time is the features' convention: float epoch seconds through whole microseconds
(``definitions.epoch_seconds`` for one value, ``batch._to_seconds(batch._to_us(...))`` for a column).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scoring_service.core.features.batch import _to_seconds, _to_us

VELOCITY_WINDOWS_S: dict[str, float] = {"1h": 3600.0, "1d": 86400.0}
NO_PREVIOUS = -1.0  # seconds_since_last when the card has no previous payment
VELOCITY_COLUMNS: list[str] = [*(f"nb_tx_{w}" for w in VELOCITY_WINDOWS_S), "seconds_since_last"]


@dataclass(frozen=True, slots=True)
class Velocity:
    nb_tx_1h: float  # the card's payments in the hour up to and including this one (>= 1)
    nb_tx_1d: float  # the same over one day (>= 1)
    seconds_since_last: float  # since the card's previous payment; -1.0 when none is known


def velocity_of(previous_times: Sequence[float], t: float) -> Velocity:
    """Velocity of a payment at epoch seconds ``t`` given the epoch times of the card's PREVIOUS payments
    (any order; times > t are ignored). A previous payment counts in a window when t - w < t_j <= t."""
    t = float(t)
    earlier = [float(x) for x in previous_times if float(x) <= t]
    counts = {w: 1.0 + sum(1 for x in earlier if t - span < x) for w, span in VELOCITY_WINDOWS_S.items()}
    since = t - max(earlier) if earlier else NO_PREVIOUS
    return Velocity(nb_tx_1h=counts["1h"], nb_tx_1d=counts["1d"], seconds_since_last=since)


def payments_velocity(payments: pd.DataFrame) -> pd.DataFrame:
    """The same definition, vectorised over the normalised payments frame (sorted by timestamp; columns
    customer_id, timestamp, ...): columns nb_tx_1h, nb_tx_1d, seconds_since_last, one row per payment,
    same index. Ties in time: earlier rows of the frame count as previous (as the batch features do).

    One sort by (card, time, row), then per window one ``searchsorted`` on an int64 key
    ``card * (n + 1) + rank``, where ``rank`` orders the float times and the window bounds
    ``t - w`` together, so the comparison is exactly the float one of :func:`velocity_of`.
    """
    n = len(payments)
    if n == 0:
        return pd.DataFrame({c: np.empty(0, dtype=np.float64) for c in VELOCITY_COLUMNS}, index=payments.index)
    codes = pd.factorize(payments["customer_id"].to_numpy())[0].astype(np.int64)
    t = _to_seconds(_to_us(payments["timestamp"].to_numpy()))
    order = np.lexsort((t, codes))  # stable: ties in time keep the frame's order
    c_s, t_s = codes[order], t[order]
    all_times = np.sort(t)
    scale = np.int64(n + 1)
    # rank of t_j: the number of times < t_j; of a bound q: the number of times <= q. t_j > q <=> rank_j >= rank_q
    # (ranks are searched in the frame's order, sorted by time: sorted queries are fast, then reordered)
    keys = c_s * scale + np.searchsorted(all_times, t, side="left")[order]
    pos = np.arange(n, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for w, span in VELOCITY_WINDOWS_S.items():
        bound = c_s * scale + np.searchsorted(all_times, t - span, side="right")[order]
        lo = np.searchsorted(keys, bound, side="left")  # the card's first payment with t_j > t - w
        out[f"nb_tx_{w}"] = (pos - lo + 1).astype(np.float64)
    same_card = np.r_[False, c_s[1:] == c_s[:-1]]
    since = np.full(n, NO_PREVIOUS)
    since[same_card] = t_s[1:][same_card[1:]] - t_s[:-1][same_card[1:]]
    out["seconds_since_last"] = since
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = pos
    return pd.DataFrame({c: out[c][inverse] for c in VELOCITY_COLUMNS}, index=payments.index)
