"""Payment and label events: protobuf encoding, validation, and the local-file event source.

Messages on Kafka (``protos/fraudscore/v1/events.proto``):

* ``<prefix>.payments``: ``PaymentEvent``, key = customer id, message timestamp = payment time.
* ``<prefix>.labels``: ``LabelEvent``, key = customer id, message timestamp = when the label
  reached the bank (payment time + the label delay).
* ``<prefix>.dead-letter``: ``DeadLetter`` (original key/value bytes and the reason).

Validation applies the online service's rules (``scoring_service.core.validation``): ids non-empty,
at most 128 characters, printable without surrounding spaces; amount finite and >= 0 (0 is a card
verification); timestamp after 2000-01-01 and at most a day ahead of now. It is vectorised: a
nightly run validates millions of events.

Without Kafka, :class:`FileEventSource` reads a parquet file (handbook columns or the normalised
payments frame) and gives the same frame a Kafka consumer would: payments in the window, labels
only where they had arrived by ``as_of``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scoring_service.core.features import epoch_seconds
from scoring_service.protos import events_pb2
from scoring_service.core.validation import MAX_CLOCK_SKEW_S, MAX_ID_LEN, MIN_TIMESTAMP

DAY_S = 86400.0
PAYMENT_COLUMNS = ["transaction_id", "customer_id", "terminal_id", "amount", "timestamp"]


class EventError(ValueError):
    """An event that cannot be used; ``reason`` goes into the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------ time helpers
def _ns_to_seconds(ns: np.ndarray) -> np.ndarray:
    return np.asarray(ns, dtype="datetime64[ns]").view("int64").astype(np.float64) / 1e9


def to_naive_utc(ts: object) -> pd.Timestamp:
    return pd.Timestamp(int(round(epoch_seconds(ts) * 1e6)), unit="us")


# ------------------------------------------------------------------------------------ encoding
def encode_payment(transaction_id: str, customer_id: str, terminal_id: str, amount: float,
                   ts_us: int, currency: str = "") -> bytes:
    ev = events_pb2.PaymentEvent(
        transaction_id=transaction_id, customer_id=customer_id, terminal_id=terminal_id,
        amount=amount, currency=currency,
    )
    ev.timestamp.seconds, ev.timestamp.nanos = divmod(int(ts_us), 1_000_000)
    ev.timestamp.nanos *= 1000
    return ev.SerializeToString()


def encode_label(transaction_id: str, customer_id: str, terminal_id: str, is_fraud: bool,
                 payment_ts_us: int, labelled_ts_us: int) -> bytes:
    ev = events_pb2.LabelEvent(transaction_id=transaction_id, customer_id=customer_id,
                               terminal_id=terminal_id, is_fraud=bool(is_fraud))
    s, us = divmod(int(payment_ts_us), 1_000_000)
    ev.payment_timestamp.seconds, ev.payment_timestamp.nanos = s, us * 1000
    s, us = divmod(int(labelled_ts_us), 1_000_000)
    ev.labelled_at.seconds, ev.labelled_at.nanos = s, us * 1000
    return ev.SerializeToString()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to produce: key, value, message timestamp (epoch ms)."""

    key: bytes
    value: bytes
    timestamp_ms: int


def _us(payments: pd.DataFrame) -> np.ndarray:
    return np.asarray(payments["timestamp"].to_numpy(), dtype="datetime64[ns]").view("int64") // 1000


def payment_messages(payments: pd.DataFrame) -> Iterator[Outgoing]:
    """The normalised payments frame -> payment messages keyed by customer, in frame order."""
    ts_us = _us(payments).tolist()
    cols = zip(payments["transaction_id"].tolist(), payments["customer_id"].tolist(),
               payments["terminal_id"].tolist(), payments["amount"].tolist(), ts_us)
    for tx, cust, term, amount, us in cols:
        yield Outgoing(cust.encode(), encode_payment(tx, cust, term, amount, us), us // 1000)


@dataclass
class LabelPlan:
    messages: list[Outgoing]
    skipped_future: int  # labels that would be stamped more than the broker's tolerance ahead


def label_messages(payments: pd.DataFrame, label_delay_days: float = 7.0, *, now: float | None = None,
                   max_future_s: float = 3000.0) -> LabelPlan:
    """Labels (``is_fraud`` of each payment) stamped payment time + delay, in that time order.

    Kafka rejects a batch holding a timestamp more than ~1 h ahead (INVALID_TIMESTAMP): labels
    that would arrive later than ``now + max_future_s`` have not reached the bank yet; they are
    skipped and counted.
    """
    if "is_fraud" not in payments.columns:
        return LabelPlan([], 0)
    known = payments["is_fraud"].to_numpy() >= 0
    p = payments.loc[known]
    pay_us = _us(p)
    lab_us = pay_us + int(round(label_delay_days * DAY_S * 1e6))
    limit_us = int(((time.time() if now is None else now) + max_future_s) * 1e6)
    ok = lab_us <= limit_us
    skipped = int((~ok).sum())
    order = np.argsort(lab_us[ok], kind="stable")
    tx = p["transaction_id"].to_numpy()[ok][order].tolist()
    cu = p["customer_id"].to_numpy()[ok][order].tolist()
    te = p["terminal_id"].to_numpy()[ok][order].tolist()
    fr = p["is_fraud"].to_numpy()[ok][order].tolist()
    pu = pay_us[ok][order].tolist()
    lu = lab_us[ok][order].tolist()
    msgs = [Outgoing(c.encode(), encode_label(t, c, m, f == 1, a, b), b // 1000)
            for t, c, m, f, a, b in zip(tx, cu, te, fr, pu, lu)]
    return LabelPlan(msgs, skipped)


# ------------------------------------------------------------------------------------ decoding
@dataclass
class Rejected:
    """A message that failed decoding or validation, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


@dataclass
class DecodedPayments:
    frame: pd.DataFrame  # normalised columns, not yet sorted
    rejected: list[Rejected] = field(default_factory=list)


def _invalid_id_reason(values: pd.Series, name: str) -> pd.Series:
    """A reason per row ('' when valid) for an id column."""
    s = values.astype(str)
    length = s.str.len()
    reason = pd.Series("", index=s.index, dtype=object)
    reason[(s != s.str.strip()) | ~s.map(str.isprintable)] = f"{name}: must be printable, without surrounding spaces"
    reason[length > MAX_ID_LEN] = f"{name}: is longer than {MAX_ID_LEN} characters"
    reason[length == 0] = f"{name}: is required"
    return reason


def validation_reasons(frame: pd.DataFrame, *, now: float | None = None) -> np.ndarray:
    """One reason per row ('' = valid), the online service's rules, vectorised.

    ``frame`` has the id columns, ``amount`` (float) and ``ts_s`` (epoch seconds, NaN = missing).
    """
    now = time.time() if now is None else now
    reason = pd.Series("", index=frame.index, dtype=object)
    ts = frame["ts_s"].to_numpy(dtype=np.float64)
    bad_ts = ~np.isfinite(ts) | (ts < MIN_TIMESTAMP) | (ts > now + MAX_CLOCK_SKEW_S)
    reason[bad_ts] = "timestamp: must be after 2000-01-01 and at most a day in the future"
    amount = frame["amount"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        reason[amount < 0] = "amount: must be >= 0 (0 is a card verification)"
    reason[~np.isfinite(amount)] = "amount: must be finite"
    for col in ("terminal_id", "customer_id", "transaction_id"):
        r = _invalid_id_reason(frame[col], col)
        reason[r != ""] = r[r != ""]
    return reason.to_numpy()


def validate_payment_event(ev: events_pb2.PaymentEvent, *, now: float | None = None) -> None:
    """Raise :class:`EventError` for one event (the vectorised rules on one row)."""
    ts = ev.timestamp.seconds + ev.timestamp.nanos / 1e9 if ev.HasField("timestamp") else math.nan
    frame = pd.DataFrame({"transaction_id": [ev.transaction_id], "customer_id": [ev.customer_id],
                          "terminal_id": [ev.terminal_id], "amount": [ev.amount], "ts_s": [ts]})
    r = validation_reasons(frame, now=now)[0]
    if r:
        raise EventError(r)


def _parse(message_type, value: bytes | None):  # type: ignore[no-untyped-def]
    """(the decoded message, "") or (None, why it could not be decoded)."""
    ev = message_type()
    try:
        if value is None:
            raise ValueError("empty message")
        ev.ParseFromString(value)
    except Exception as exc:  # DecodeError and friends
        return None, f"undecodable {message_type.__name__}: {exc}"[:500]
    return ev, ""


def decode_payments(messages: Iterable[tuple[str, int, int, bytes | None, bytes | None]], *,
                    now: float | None = None) -> DecodedPayments:
    """``(topic, partition, offset, key, value)`` -> normalised payments + rejected messages."""
    PaymentEvent = events_pb2.PaymentEvent
    tx, cu, te, am, ts_us, src = [], [], [], [], [], []
    rejected: list[Rejected] = []
    for topic, part, off, key, value in messages:
        ev, why = _parse(PaymentEvent, value)
        if ev is None:
            rejected.append(Rejected(topic, part, off, key, value, why))
            continue
        if not ev.HasField("timestamp"):
            rejected.append(Rejected(topic, part, off, key, value, "timestamp: is required"))
            continue
        tx.append(ev.transaction_id)
        cu.append(ev.customer_id)
        te.append(ev.terminal_id)
        am.append(ev.amount)
        ts_us.append(ev.timestamp.seconds * 1_000_000 + ev.timestamp.nanos // 1000)
        src.append((topic, part, off, key, value))
    ts_arr = np.asarray(ts_us, dtype=np.int64)
    raw = pd.DataFrame({"transaction_id": tx, "customer_id": cu, "terminal_id": te,
                        "amount": np.asarray(am, dtype=np.float64), "ts_s": ts_arr / 1e6})
    reasons = validation_reasons(raw, now=now) if len(raw) else np.empty(0, dtype=object)
    bad = reasons != ""
    for i in np.flatnonzero(bad):
        topic, part, off, key, value = src[i]
        rejected.append(Rejected(topic, part, off, key, value, str(reasons[i])))
    good = ~bad
    frame = pd.DataFrame({
        "transaction_id": raw["transaction_id"].to_numpy()[good],
        "customer_id": raw["customer_id"].to_numpy()[good],
        "terminal_id": raw["terminal_id"].to_numpy()[good],
        "amount": raw["amount"].to_numpy()[good],
        "timestamp": (ts_arr[good] * 1000).astype("datetime64[ns]"),
    })
    return DecodedPayments(frame, rejected)


def decode_labels(messages: Iterable[tuple[str, int, int, bytes | None, bytes | None]]) -> tuple[pd.DataFrame, list[Rejected]]:
    """Label messages -> frame (transaction_id, is_fraud int8, labelled_at_s) + rejected ones."""
    LabelEvent = events_pb2.LabelEvent
    tx, fr, at = [], [], []
    rejected: list[Rejected] = []
    for topic, part, off, key, value in messages:
        ev, why = _parse(LabelEvent, value)
        if ev is None:
            rejected.append(Rejected(topic, part, off, key, value, why))
            continue
        if not ev.transaction_id or len(ev.transaction_id) > MAX_ID_LEN:
            rejected.append(Rejected(topic, part, off, key, value, "transaction_id: is required, at most 128 characters"))
            continue
        tx.append(ev.transaction_id)
        fr.append(1 if ev.is_fraud else 0)
        at.append(ev.labelled_at.seconds + ev.labelled_at.nanos / 1e9)
    return pd.DataFrame({"transaction_id": tx, "is_fraud": np.asarray(fr, dtype=np.int8),
                         "labelled_at_s": np.asarray(at, dtype=np.float64)}), rejected


def dead_letter_value(r: Rejected, job: str, now: float | None = None) -> bytes:
    dl = events_pb2.DeadLetter(source_topic=r.topic, partition=r.partition, offset=r.offset,
                               key=r.key or b"", value=r.value or b"", reason=r.reason, job=job)
    dl.rejected_at.FromNanoseconds(int((time.time() if now is None else now) * 1e9))
    return dl.SerializeToString()


def attach_labels(payments: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Payments with ``is_fraud`` from the labels that arrived (-1 = no label yet); time-sorted."""
    out = payments.copy()
    if len(labels):
        lab = labels.drop_duplicates("transaction_id", keep="last").set_index("transaction_id")["is_fraud"]
        out["is_fraud"] = out["transaction_id"].map(lab).fillna(-1).astype(np.int8).to_numpy()
    else:
        out["is_fraud"] = np.full(len(out), -1, dtype=np.int8)
    return sort_payments(out)


def sort_payments(payments: pd.DataFrame) -> pd.DataFrame:
    """Time order with a deterministic tie-break (transaction id), whatever order events came in."""
    p = payments.drop_duplicates("transaction_id", keep="first")
    order = np.lexsort((p["transaction_id"].to_numpy(), p["timestamp"].to_numpy()))
    return p.iloc[order].reset_index(drop=True)


# ------------------------------------------------------------------------------------ file source
def read_payments_file(path: str | Path) -> pd.DataFrame:
    """A parquet file of handbook columns or of the normalised frame -> normalised frame."""
    from scoring_service.core import features

    df = pd.read_parquet(Path(path))
    if "TRANSACTION_ID" in df.columns:
        return features.normalise_handbook(df)
    missing = [c for c in PAYMENT_COLUMNS if c not in df.columns]
    if missing:
        raise EventError(f"{path}: neither handbook columns nor a payments frame (missing {missing})")
    df = df.copy()
    for c in ("transaction_id", "customer_id", "terminal_id"):
        df[c] = df[c].astype(str)
    df["amount"] = df["amount"].astype("float64")
    ts = pd.to_datetime(df["timestamp"])
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    df["timestamp"] = ts.astype("datetime64[ns]")
    return df


@dataclass
class WindowEvents:
    payments: pd.DataFrame  # normalised, time-sorted, is_fraud -1 where the label had not arrived
    events_consumed: int
    rejected: list[Rejected]


def window_from_frame(payments: pd.DataFrame, start: float, end: float, label_delay_days: float,
                      *, now: float | None = None) -> WindowEvents:
    """What the Kafka path sees for [start, end): payments in the window, validated, with the
    labels stamped (payment time + delay) before ``end``."""
    ts = _ns_to_seconds(payments["timestamp"].to_numpy())
    sel = (ts >= start) & (ts < end)
    p = payments.loc[sel]
    raw = pd.DataFrame({c: p[c].to_numpy() for c in ("transaction_id", "customer_id", "terminal_id", "amount")})
    raw["ts_s"] = ts[sel]
    reasons = validation_reasons(raw, now=now) if len(raw) else np.empty(0, dtype=object)
    bad = reasons != ""
    rejected = [Rejected("file", 0, int(i), None, None, str(reasons[i])) for i in np.flatnonzero(bad)]
    good = p.loc[~bad, PAYMENT_COLUMNS + (["is_fraud"] if "is_fraud" in p.columns else [])].copy()
    if "is_fraud" in good.columns:
        arrived = ts[sel][~bad] + label_delay_days * DAY_S < end
        good["is_fraud"] = np.where(arrived, good["is_fraud"].to_numpy(), -1).astype(np.int8)
    else:
        good["is_fraud"] = np.full(len(good), -1, dtype=np.int8)
    return WindowEvents(sort_payments(good), int(sel.sum()), rejected)


class FileEventSource:
    """The event source used when no Kafka is configured: a local parquet file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._frame: pd.DataFrame | None = None

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            if not self.path.exists():
                raise EventError(f"event file {self.path} does not exist")
            self._frame = read_payments_file(self.path)
        return self._frame

    def read_window(self, start: float, end: float, label_delay_days: float) -> WindowEvents:
        return window_from_frame(self.frame(), start, end, label_delay_days)
