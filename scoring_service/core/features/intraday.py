"""Intraday state: the payments a card made since the state the cache holds for it.

The nightly run gives each card its state as of the run's ``as_of``; the service appends every
payment it scores to the card's intraday list (Redis, ``core.cache_layout.intraday_key``). On read
the two are merged: the cached state advanced by each intraday payment made after ``as_of`` (and
not after the payment being scored), in time order, so a payment a second after another is judged
with it. A payment already in the list under the same transaction id (a retried request) is the
payment being scored: it is left out of the merge, so a retry gets the answer the first try got and
counts once. Payments up to ``as_of`` are in the cached state already (the nightly read them from
the event log), so a nightly switch in the middle of a burst neither loses nor double-counts any.

Not merged: window expiry between ``as_of`` and now (the cached 1/7/30-day aggregates stay as of
``as_of``, as before intraday state), and the terminal's state (its features use labels delayed by
``LABEL_DELAY_DAYS``, which today's payments cannot change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scoring_service.core.features.online import advance_customer_state


@dataclass(frozen=True, slots=True)
class IntradayPayment:
    timestamp: float  # epoch seconds
    amount: float
    transaction_id: str


def merged_customer_state(
    state: Mapping[str, float] | None,
    state_as_of: float,
    payments: Sequence[IntradayPayment],
    now: float,
    transaction_id: str,
) -> dict[str, float] | None:
    """``state`` (as of ``state_as_of``; None: none) advanced by the intraday payments made in
    (``state_as_of``, ``now``], the payment ``transaction_id`` left out. None when both are empty."""
    merged = dict(state) if state else None
    for p in sorted(payments, key=lambda p: (p.timestamp, p.transaction_id)):
        if state_as_of < p.timestamp <= now and p.transaction_id != transaction_id:
            merged = advance_customer_state(merged, p.amount, p.timestamp)
    return merged


def previous_times(payments: Sequence[IntradayPayment], now: float, transaction_id: str) -> list[float]:
    """Times of the card's payments before the one being scored (for ``velocity.velocity_of``)."""
    return [p.timestamp for p in payments if p.timestamp <= now and p.transaction_id != transaction_id]
