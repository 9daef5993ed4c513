"""Payment and label events as the batch jobs see them: data types and window rules (pure pandas, no I/O).

* The nightly **window** ends at ``as_of`` and reaches back the longest feature window plus the
  label delay (:func:`nightly_window`), the constants of ``scoring_service.core.features``.
* A window's **payments** are those with a payment time in [start, end), validated with the
  online service's rules (``scoring_service.core.validation``); a **label** counts only where it
  had reached the bank (payment time + the label delay) before the end of the window.
* **Order** is time, ties broken by transaction id, duplicates of a transaction id dropped
  (:func:`sort_payments`), whatever order the events came in: the same window gives the same frame.

Every event source (Kafka, a Parquet file, an in-memory frame) gives a :class:`WindowEvents`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.core.features import FEATURE_WINDOW_DAYS, LABEL_DELAY_DAYS
from scoring_service.core.validation import validation_reasons

DAY_S = 86400.0
PAYMENT_COLUMNS = ["transaction_id", "customer_id", "terminal_id", "amount", "timestamp"]

PartitionOffsets = tuple[str, int, int, int]  # topic, partition, first offset read, first offset not read


class EventError(ValueError):
    """An event (or a file of events) that cannot be used; ``reason`` goes into the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventSourceError(RuntimeError):
    """The event source cannot be read (a broker that does not answer, a topic that is gone, a reader that died)."""


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) in epoch seconds; ``end`` is the run's ``as_of``."""

    start: float
    end: float


def nightly_window(as_of: float, start: float | None = None) -> Window:
    """The feature windows before ``as_of``: the longest one plus the label delay (``start`` overrides)."""
    default_start = as_of - (FEATURE_WINDOW_DAYS + LABEL_DELAY_DAYS) * DAY_S
    return Window(default_start if start is None else float(start), float(as_of))


@dataclass
class Rejected:
    """A message that failed decoding or validation, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


def count_reasons(rejected: Iterable[Rejected]) -> dict[str, int]:
    """Rejections per field (the part of the reason before ``:``)."""
    out: dict[str, int] = {}
    for r in rejected:
        key = r.reason.split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out


@dataclass
class WindowEvents:
    """What an event source read for one window."""

    payments: pd.DataFrame  # normalised, time-sorted, is_fraud -1 where the label had not arrived
    events_consumed: int  # messages (payments and labels) or rows read
    dead_letters: int = 0  # events rejected (sent to the dead-letter topic where there is one)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    offsets: list[PartitionOffsets] = field(default_factory=list)  # empty where the source has none
    rejected: list[Rejected] = field(default_factory=list)  # the rejected events still in hand (file sources)
    details: dict[str, Any] = field(default_factory=dict)  # source-specific, recorded with the run


def seconds(timestamps: Any) -> np.ndarray:
    """A ``datetime64`` column or array -> epoch seconds (float64)."""
    return np.asarray(timestamps, dtype="datetime64[ns]").view("int64").astype(np.float64) / 1e9


def in_window(payments: pd.DataFrame, start: float, end: float) -> pd.DataFrame:
    """The payments with a payment time in [start, end)."""
    ts = seconds(payments["timestamp"].to_numpy())
    return payments.loc[(ts >= start) & (ts < end)]


def sort_payments(payments: pd.DataFrame) -> pd.DataFrame:
    """Time order with a deterministic tie-break (transaction id), whatever order events came in."""
    p = payments.drop_duplicates("transaction_id", keep="first")
    order = np.lexsort((p["transaction_id"].to_numpy(), p["timestamp"].to_numpy()))
    return p.iloc[order].reset_index(drop=True)


def attach_labels(payments: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Payments with ``is_fraud`` from the labels that arrived (-1 = no label yet); time-sorted."""
    out = payments.copy()
    if len(labels):
        lab = labels.drop_duplicates("transaction_id", keep="last").set_index("transaction_id")["is_fraud"]
        out["is_fraud"] = out["transaction_id"].map(lab).fillna(-1).astype(np.int8).to_numpy()
    else:
        out["is_fraud"] = np.full(len(out), -1, dtype=np.int8)
    return sort_payments(out)


def window_from_frame(payments: pd.DataFrame, start: float, end: float, label_delay_days: float = LABEL_DELAY_DAYS,
                      *, labels_until: float | None = None, now: float | None = None) -> WindowEvents:
    """What a Kafka consumer sees for [start, end) of a frame holding every payment and its label:
    the payments in the window, validated (rejects counted, not raised), with the labels stamped
    (payment time + delay) before ``labels_until`` (default ``end``)."""
    ts = seconds(payments["timestamp"].to_numpy())
    sel = (ts >= start) & (ts < end)
    p = payments.loc[sel]
    raw = pd.DataFrame({c: p[c].to_numpy() for c in ("transaction_id", "customer_id", "terminal_id", "amount")})
    raw["ts_s"] = ts[sel]
    reasons = validation_reasons(raw, now=now) if len(raw) else np.empty(0, dtype=object)
    bad = reasons != ""
    rejected = [Rejected("file", 0, int(i), None, None, str(reasons[i])) for i in np.flatnonzero(bad)]
    good = p.loc[~bad, PAYMENT_COLUMNS + (["is_fraud"] if "is_fraud" in p.columns else [])].copy()
    if "is_fraud" in good.columns:
        arrived = ts[sel][~bad] + label_delay_days * DAY_S < (end if labels_until is None else labels_until)
        good["is_fraud"] = np.where(arrived, good["is_fraud"].to_numpy(), -1).astype(np.int8)
    else:
        good["is_fraud"] = np.full(len(good), -1, dtype=np.int8)
    return WindowEvents(sort_payments(good), int(sel.sum()), dead_letters=len(rejected),
                        dead_letter_reasons=count_reasons(rejected), rejected=rejected)
