"""Payment validation: every rule names the field it is about (gRPC ``INVALID_ARGUMENT``, dead letters).

One set of rules, in two forms that share the constants and the messages:

* :func:`validate_payment`: one request of the online path; raises :class:`ValidationError`.
* :func:`validation_reasons`: a frame of events for the batch jobs (millions per run); one reason
  per row, ``""`` where the row is valid.

The rules, in the order they are checked (the first failing one is reported): each id is
required, at most ``MAX_ID_LEN`` characters, printable without surrounding spaces; the amount is
finite, >= 0 (0 is a card verification) and at most ``MAX_AMOUNT``; the timestamp is after
2000-01-01 and at most a day ahead of now. ``tests/unit/test_validation.py`` checks that both
forms agree.

Every number the model sees is bounded by these rules: the features are float32, in which a
float64 amount such as 1e39 is infinite (XGBoost refuses such a row, and with it its whole
batch), and sums of squared amounts overflow long before; ``MAX_AMOUNT`` keeps the amount, its
30-day sums and its squares finite and exact enough in float32.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MAX_ID_LEN = 128
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_LEN = 256
# Payments from before the first card networks, or a day in the future, are clock or unit bugs.
MIN_TIMESTAMP = 946_684_800.0  # 2000-01-01
MAX_CLOCK_SKEW_S = 86_400.0
# The largest amount of one payment, in the units of its currency (10 million: above any card
# payment, and float32-safe for the features built from it: sums and squares stay finite).
MAX_AMOUNT = 10_000_000.0
_CURRENCY = re.compile(r"^[A-Z]{3}$")

ID_FIELDS = ("transaction_id", "customer_id", "terminal_id")  # checked in this order
# The message of each rule (after ``<field>: ``), shared by the scalar and the vectorised form.
ID_REQUIRED = "is required"
ID_TOO_LONG = f"is longer than {MAX_ID_LEN} characters"
ID_NOT_PRINTABLE = "must be printable, without surrounding spaces"
AMOUNT_NOT_FINITE = "must be finite"
AMOUNT_NEGATIVE = "must be >= 0 (0 is a card verification)"
AMOUNT_TOO_LARGE = f"must be at most {MAX_AMOUNT:,.0f}"
TIMESTAMP_OUT_OF_RANGE = "must be after 2000-01-01 and at most a day in the future"


class ValidationError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class Payment:
    """A validated payment, in the types the scorer works with."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    currency: str
    timestamp: float  # epoch seconds
    attributes: dict[str, str] = field(default_factory=dict)


def _check_id(name: str, value: str, required: bool = True) -> None:
    if not value:
        if required:
            raise ValidationError(name, ID_REQUIRED)
        return
    if len(value) > MAX_ID_LEN:
        raise ValidationError(name, ID_TOO_LONG)
    if not value.isprintable() or value != value.strip():
        raise ValidationError(name, ID_NOT_PRINTABLE)


def _timestamp_in_range(timestamp: float, now: float) -> bool:
    return MIN_TIMESTAMP <= timestamp <= now + MAX_CLOCK_SKEW_S


def _timestamps_in_range(ts: np.ndarray, now: float) -> np.ndarray:
    """``_timestamp_in_range`` on an array (NaN is out of range)."""
    return (ts >= MIN_TIMESTAMP) & (ts <= now + MAX_CLOCK_SKEW_S)


def validate_payment(
    *,
    transaction_id: str,
    customer_id: str,
    terminal_id: str,
    amount: float,
    currency: str,
    timestamp: float | None,
    attributes: dict[str, str] | None,
    default_currency: str,
    now: float | None = None,
    prefix: str = "transaction.",
) -> Payment:
    _check_id(prefix + "transaction_id", transaction_id)
    _check_id(prefix + "customer_id", customer_id)
    _check_id(prefix + "terminal_id", terminal_id)
    if not math.isfinite(amount):
        raise ValidationError(prefix + "amount", f"{AMOUNT_NOT_FINITE}, got {amount}")
    if amount < 0:
        raise ValidationError(prefix + "amount", f"{AMOUNT_NEGATIVE}, got {amount}")
    if amount > MAX_AMOUNT:
        raise ValidationError(prefix + "amount", f"{AMOUNT_TOO_LARGE}, got {amount}")
    currency = currency or default_currency
    if not _CURRENCY.match(currency):
        raise ValidationError(prefix + "currency", f"must be an ISO 4217 code like EUR, got {currency!r}")
    now = time.time() if now is None else now
    if timestamp is None:
        timestamp = now
    elif not _timestamp_in_range(timestamp, now):
        raise ValidationError(prefix + "timestamp", TIMESTAMP_OUT_OF_RANGE)
    attributes = dict(attributes or {})
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValidationError(prefix + "attributes", f"has more than {MAX_ATTRIBUTES} entries")
    for k, v in attributes.items():
        if len(k) > MAX_ATTRIBUTE_LEN or len(v) > MAX_ATTRIBUTE_LEN:
            raise ValidationError(prefix + "attributes", f"keys and values are at most {MAX_ATTRIBUTE_LEN} characters")
    amount = float(amount) + 0.0  # -0.0 -> 0.0
    return Payment(transaction_id, customer_id, terminal_id, amount, currency, float(timestamp), attributes)


# ------------------------------------------------------------------------------------ vectorised
def _id_reasons(values: pd.Series, name: str) -> np.ndarray:
    """``_check_id`` on a column: a reason per row (``""`` when valid)."""
    s = values.astype(str)
    length = s.str.len().to_numpy()
    reason = np.full(len(s), "", dtype=object)
    # Assigned from the last rule to the first, so the first failing rule wins (as in _check_id).
    reason[((s != s.str.strip()) | ~s.map(str.isprintable)).to_numpy(dtype=bool)] = f"{name}: {ID_NOT_PRINTABLE}"
    reason[length > MAX_ID_LEN] = f"{name}: {ID_TOO_LONG}"
    reason[length == 0] = f"{name}: {ID_REQUIRED}"
    return reason


def validation_reasons(frame: pd.DataFrame, *, now: float | None = None) -> np.ndarray:
    """:func:`validate_payment`'s rules on a frame: one reason per row (``""`` = valid).

    ``frame`` has the id columns, ``amount`` (float) and ``ts_s`` (epoch seconds, NaN = missing).
    A reason reads ``<field>: <message>``, the field and message ``validate_payment`` reports
    (without its ``, got <value>`` suffix).
    """
    now = time.time() if now is None else now
    reason = np.full(len(frame), "", dtype=object)
    # Assigned from the last rule to the first, so the first failing rule wins (as in validate_payment).
    ts = frame["ts_s"].to_numpy(dtype=np.float64)
    amount = frame["amount"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        reason[~_timestamps_in_range(ts, now)] = f"timestamp: {TIMESTAMP_OUT_OF_RANGE}"
        reason[amount > MAX_AMOUNT] = f"amount: {AMOUNT_TOO_LARGE}"
        reason[amount < 0] = f"amount: {AMOUNT_NEGATIVE}"
    reason[~np.isfinite(amount)] = f"amount: {AMOUNT_NOT_FINITE}"
    for name in reversed(ID_FIELDS):
        r = _id_reasons(frame[name], name)
        bad = r != ""
        reason[bad] = r[bad]
    return reason
