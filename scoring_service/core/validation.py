"""Request validation: every rule names the field it is about, for gRPC ``INVALID_ARGUMENT``."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

MAX_ID_LEN = 128
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_LEN = 256
# Payments from before the first card networks, or a day in the future, are clock or unit bugs.
MIN_TIMESTAMP = 946_684_800.0  # 2000-01-01
MAX_CLOCK_SKEW_S = 86_400.0
_CURRENCY = re.compile(r"^[A-Z]{3}$")


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
            raise ValidationError(name, "is required")
        return
    if len(value) > MAX_ID_LEN:
        raise ValidationError(name, f"is longer than {MAX_ID_LEN} characters")
    if not value.isprintable() or value != value.strip():
        raise ValidationError(name, "must be printable, without surrounding spaces")


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
        raise ValidationError(prefix + "amount", f"must be finite, got {amount}")
    if amount < 0:
        raise ValidationError(prefix + "amount", f"must be >= 0 (0 is a card verification), got {amount}")
    currency = currency or default_currency
    if not _CURRENCY.match(currency):
        raise ValidationError(prefix + "currency", f"must be an ISO 4217 code like EUR, got {currency!r}")
    now = time.time() if now is None else now
    if timestamp is None:
        timestamp = now
    elif not (MIN_TIMESTAMP <= timestamp <= now + MAX_CLOCK_SKEW_S):
        raise ValidationError(
            prefix + "timestamp", "must be after 2000-01-01 and at most a day in the future"
        )
    attributes = dict(attributes or {})
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValidationError(prefix + "attributes", f"has more than {MAX_ATTRIBUTES} entries")
    for k, v in attributes.items():
        if len(k) > MAX_ATTRIBUTE_LEN or len(v) > MAX_ATTRIBUTE_LEN:
            raise ValidationError(prefix + "attributes", f"keys and values are at most {MAX_ATTRIBUTE_LEN} characters")
    return Payment(transaction_id, customer_id, terminal_id, float(amount), currency, float(timestamp), attributes)
