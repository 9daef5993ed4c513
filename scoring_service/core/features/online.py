"""The online path: the features of one payment from the cached states of its two entities.

Parity with the batch path
    ``batch.entity_states(payments, as_of=t)`` gives exactly the window aggregates of a payment at
    ``t`` with that payment left out; :func:`online_features` adds the payment
    (``state.customer_aggregates``) and calls the derivation the batch path calls on whole
    columns (``definitions._derive``), here on Python floats. So a payment's online features equal
    its row of ``batch.payments_features`` (to float32 rounding), which tests/unit/test_features.py
    checks on real payments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from scoring_service.core.features.definitions import N_FEATURES, derive_row, epoch_seconds
from scoring_service.core.features.state import (
    CUSTOMER_AGGREGATE_OF,
    add_payment,
    customer_aggregates,
    customer_state_aggregates,
    empty_customer_state,
    terminal_aggregates,
)

# (amount, timestamp, customer state or None, terminal state or None)
OnlineRow = tuple[float, Any, Mapping[str, float] | None, Mapping[str, float] | None]


def _online_row(amount: float, timestamp: Any, cs: Mapping[str, float] | None, ts: Mapping[str, float] | None) -> list[float]:
    a = float(amount)
    return derive_row(a, epoch_seconds(timestamp), customer_aggregates(cs, a), terminal_aggregates(ts))


def online_features(
    amount: float, timestamp: datetime | float | Any, customer_state: Mapping[str, float] | None,
    terminal_state: Mapping[str, float] | None,
) -> np.ndarray:
    """Features of ONE payment from entity states taken just before it (None = unseen entity)."""
    return np.array(_online_row(amount, timestamp, customer_state, terminal_state), dtype=np.float32)


def online_features_many(rows: Sequence[OnlineRow]) -> np.ndarray:
    """(n, F) float32 features of rows ``(amount, timestamp, customer_state, terminal_state)``."""
    if len(rows) == 0:
        return np.empty((0, N_FEATURES), dtype=np.float32)
    return np.array([_online_row(*r) for r in rows], dtype=np.float32)


def advance_customer_state(state: Mapping[str, float] | None, amount: float, timestamp: Any) -> dict[str, float]:
    """The customer's state after this payment (windows gain it; nothing expires here)."""
    a = float(amount)
    t = epoch_seconds(timestamp)
    s = empty_customer_state() if state is None else dict(state)
    c = add_payment(customer_state_aggregates(state), a)
    c["mx30"] = max(c["mx30"], a)  # the state's max includes its last payment
    s.update({key: c[agg] for key, agg in CUSTOMER_AGGREGATE_OF.items()})
    s["avg_amount_30d"] = s["sum_amount_30d"] / s["nb_tx_30d"]
    s["last_ts"] = max(s.get("last_ts", -1.0), t)
    return s
