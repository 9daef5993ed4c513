"""The messages on Kafka (``protos/fraudscore/v1/events.proto``): encoding, decoding, dead letters.

* ``<prefix>.payments``: ``PaymentEvent``, key = customer id, message timestamp = payment time.
* ``<prefix>.labels``: ``LabelEvent``, key = customer id, message timestamp = when the label
  reached the bank (payment time + the label delay).
* ``<prefix>.dead-letter``: ``DeadLetter`` (original key/value bytes and the reason).

Decoding validates with the online service's rules, vectorised
(``scoring_service.core.validation.validation_reasons``): a nightly run decodes millions of
events. What cannot be decoded or is invalid comes back as :class:`~scoring_service.core.events.Rejected`;
a payment event without an amount (``optional double amount``: absent is not 0) or without a
timestamp is rejected too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.core.events import DAY_S, EventError, Rejected
from scoring_service.core.features import LABEL_DELAY_DAYS
from scoring_service.core.validation import MAX_ID_LEN, validation_reasons
from scoring_service.protos import events_pb2

RawMessage = tuple[str, int, int, bytes | None, bytes | None]  # topic, partition, offset, key, value


# ------------------------------------------------------------------------------------ encoding
def encode_payment(transaction_id: str, customer_id: str, terminal_id: str, amount: float,
                   ts_us: int, currency: str = "") -> bytes:
    ev = events_pb2.PaymentEvent(
        transaction_id=transaction_id, customer_id=customer_id, terminal_id=terminal_id,
        amount=amount, currency=currency,
    )
    ev.timestamp.seconds, ev.timestamp.nanos = divmod(int(ts_us), 1_000_000)
    ev.timestamp.nanos *= 1000
    return bytes(ev.SerializeToString())


def encode_label(transaction_id: str, customer_id: str, terminal_id: str, is_fraud: bool,
                 payment_ts_us: int, labelled_ts_us: int) -> bytes:
    ev = events_pb2.LabelEvent(transaction_id=transaction_id, customer_id=customer_id,
                               terminal_id=terminal_id, is_fraud=bool(is_fraud))
    s, us = divmod(int(payment_ts_us), 1_000_000)
    ev.payment_timestamp.seconds, ev.payment_timestamp.nanos = s, us * 1000
    s, us = divmod(int(labelled_ts_us), 1_000_000)
    ev.labelled_at.seconds, ev.labelled_at.nanos = s, us * 1000
    return bytes(ev.SerializeToString())


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
               payments["terminal_id"].tolist(), payments["amount"].tolist(), ts_us, strict=True)
    for tx, cust, term, amount, us in cols:
        yield Outgoing(cust.encode(), encode_payment(tx, cust, term, amount, us), us // 1000)


@dataclass
class LabelPlan:
    messages: list[Outgoing]
    skipped_future: int  # labels that would be stamped more than the broker's tolerance ahead


def label_messages(payments: pd.DataFrame, label_delay_days: float = LABEL_DELAY_DAYS, *, now: float | None = None,
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
            for t, c, m, f, a, b in zip(tx, cu, te, fr, pu, lu, strict=True)]
    return LabelPlan(msgs, skipped)


# ------------------------------------------------------------------------------------ decoding
@dataclass
class DecodedPayments:
    frame: pd.DataFrame  # normalised columns, not yet sorted
    rejected: list[Rejected] = field(default_factory=list)


AMOUNT_REQUIRED = "amount: is required"
TIMESTAMP_REQUIRED = "timestamp: is required"


def validate_payment_event(ev: Any, *, now: float | None = None) -> None:
    """Raise :class:`EventError` for one ``PaymentEvent`` (the vectorised rules on one row)."""
    if not ev.HasField("amount"):
        raise EventError(AMOUNT_REQUIRED)
    ts = ev.timestamp.seconds + ev.timestamp.nanos / 1e9 if ev.HasField("timestamp") else math.nan
    frame = pd.DataFrame({"transaction_id": [ev.transaction_id], "customer_id": [ev.customer_id],
                          "terminal_id": [ev.terminal_id], "amount": [ev.amount], "ts_s": [ts]})
    r = validation_reasons(frame, now=now)[0]
    if r:
        raise EventError(r)


def _parse(message_type: Any, value: bytes | None) -> tuple[Any, str]:
    """(the decoded message, "") or (None, why it could not be decoded)."""
    ev = message_type()
    try:
        if value is None:
            raise ValueError("empty message")
        ev.ParseFromString(value)
    except Exception as exc:  # DecodeError and friends
        return None, f"undecodable {message_type.__name__}: {exc}"[:500]
    return ev, ""


def decode_payments(messages: Iterable[RawMessage], *, now: float | None = None) -> DecodedPayments:
    """``(topic, partition, offset, key, value)`` -> normalised payments + rejected messages."""
    payment_event = events_pb2.PaymentEvent
    tx, cu, te, am, ts_us = [], [], [], [], []
    src: list[RawMessage] = []
    rejected: list[Rejected] = []
    for topic, part, off, key, value in messages:
        ev, why = _parse(payment_event, value)
        if ev is None:
            rejected.append(Rejected(topic, part, off, key, value, why))
            continue
        if not ev.HasField("amount"):
            rejected.append(Rejected(topic, part, off, key, value, AMOUNT_REQUIRED))
            continue
        if not ev.HasField("timestamp"):
            rejected.append(Rejected(topic, part, off, key, value, TIMESTAMP_REQUIRED))
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


def decode_labels(messages: Iterable[RawMessage]) -> tuple[pd.DataFrame, list[Rejected]]:
    """Label messages -> frame (transaction_id, is_fraud int8, labelled_at_s) + rejected ones."""
    label_event = events_pb2.LabelEvent
    tx, fr, at = [], [], []
    rejected: list[Rejected] = []
    for topic, part, off, key, value in messages:
        ev, why = _parse(label_event, value)
        if ev is None:
            rejected.append(Rejected(topic, part, off, key, value, why))
            continue
        if not ev.transaction_id or len(ev.transaction_id) > MAX_ID_LEN:
            rejected.append(Rejected(topic, part, off, key, value,
                                     f"transaction_id: is required, at most {MAX_ID_LEN} characters"))
            continue
        tx.append(ev.transaction_id)
        fr.append(1 if ev.is_fraud else 0)
        at.append(ev.labelled_at.seconds + ev.labelled_at.nanos / 1e9)
    return pd.DataFrame({"transaction_id": tx, "is_fraud": np.asarray(fr, dtype=np.int8),
                         "labelled_at_s": np.asarray(at, dtype=np.float64)}), rejected


def dead_letter_value(r: Rejected, job: str, now: float | None = None) -> bytes:
    """The ``DeadLetter`` message for a rejected one: where it came from, its bytes, the reason."""
    dl = events_pb2.DeadLetter(source_topic=r.topic, partition=r.partition, offset=r.offset,
                               key=r.key or b"", value=r.value or b"", reason=r.reason, job=job)
    dl.rejected_at.FromNanoseconds(int((time.time() if now is None else now) * 1e9))
    return bytes(dl.SerializeToString())
