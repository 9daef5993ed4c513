"""The entity states: the one schema of what the cache keeps per customer and per terminal.

A state is a JSON object of plain floats (timestamps in epoch seconds, -1 = none), summing up an
entity's payments *before* the payment being scored. ``batch.entity_states`` computes them for a
point in time; ``online.online_features`` turns them into the raw aggregates of ``_derive``
(adding the payment being scored); ``online.advance_customer_state`` adds a payment to one.

The key names are a stored format (Redis entries, ``CacheEntry.state``): never rename one.
Public functions take and return plain ``dict[str, float]`` (what a decoded cache entry holds);
:class:`CustomerState` / :class:`TerminalState` name and document every key, in their order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypedDict, cast

import numpy as np

from scoring_service.core.features.definitions import CUSTOMER_WINDOWS, TERMINAL_WINDOWS, V, _div_np


class CustomerState(TypedDict):
    """A customer (card), from its payments up to the state's time (windows end then)."""

    nb_tx_1d: float  # payments in the last day
    sum_amount_1d: float  # their total amount
    nb_tx_7d: float
    sum_amount_7d: float
    nb_tx_30d: float
    sum_amount_30d: float
    sumsq_amount_30d: float  # sum of the squared amounts, 30 days
    max_amount_30d: float  # the largest amount in 30 days (0 when none)
    avg_amount_30d: float  # the customer's usual amount (sum / count, 30 days; 0 when none)
    nb_fraud_known_30d: float  # its frauds in the 30 days before the label delay
    last_ts: float  # time of its last payment (-1 = none)


class TerminalState(TypedDict):
    """A terminal, from the labels of its payments up to LABEL_DELAY_DAYS before the state's time."""

    nb_tx_1d_delayed: float  # its payments in the day that ends LABEL_DELAY_DAYS before the state's time
    nb_fraud_1d_delayed: float  # the known frauds among them
    nb_tx_7d_delayed: float
    nb_fraud_7d_delayed: float
    nb_tx_14d_delayed: float
    nb_fraud_14d_delayed: float
    nb_tx_30d_delayed: float
    nb_fraud_30d_delayed: float
    first_fraud_ts_delayed: float  # first known fraud in the 30-day delayed window (-1 = none)
    last_fraud_ts_delayed: float  # last known fraud in it (-1 = none)
    nb_tx_since_first_fraud_delayed: float  # labelled payments from that first fraud on, it included
    nb_tx_after_last_fraud_delayed: float  # labelled payments after the last fraud
    last_ts: float  # time of its last payment (-1 = none)


CUSTOMER_STATE_KEYS: Final[tuple[str, ...]] = tuple(CustomerState.__annotations__)
TERMINAL_STATE_KEYS: Final[tuple[str, ...]] = tuple(TerminalState.__annotations__)

EMPTY_CUSTOMER_STATE: Final[CustomerState] = {
    "nb_tx_1d": 0.0, "sum_amount_1d": 0.0, "nb_tx_7d": 0.0, "sum_amount_7d": 0.0, "nb_tx_30d": 0.0, "sum_amount_30d": 0.0,
    "sumsq_amount_30d": 0.0, "max_amount_30d": 0.0, "avg_amount_30d": 0.0, "nb_fraud_known_30d": 0.0, "last_ts": -1.0,
}
EMPTY_TERMINAL_STATE: Final[TerminalState] = {
    "nb_tx_1d_delayed": 0.0, "nb_fraud_1d_delayed": 0.0, "nb_tx_7d_delayed": 0.0, "nb_fraud_7d_delayed": 0.0,
    "nb_tx_14d_delayed": 0.0, "nb_fraud_14d_delayed": 0.0, "nb_tx_30d_delayed": 0.0, "nb_fraud_30d_delayed": 0.0,
    "first_fraud_ts_delayed": -1.0, "last_fraud_ts_delayed": -1.0, "nb_tx_since_first_fraud_delayed": 0.0,
    "nb_tx_after_last_fraud_delayed": 0.0, "last_ts": -1.0,
}

# the same, as the plain mappings the functions below read
_EMPTY_CUSTOMER: Final = cast("Mapping[str, float]", EMPTY_CUSTOMER_STATE)
_EMPTY_TERMINAL: Final = cast("Mapping[str, float]", EMPTY_TERMINAL_STATE)

# state key -> the raw aggregate of ``_derive`` it holds (without the payment being scored).
# The keys left out are the state's own: ``avg_amount_30d`` (for the policy and the entity
# scores) and ``last_ts``.
CUSTOMER_AGGREGATE_OF: Final[dict[str, str]] = {
    **{k: v for w in CUSTOMER_WINDOWS for k, v in ((f"nb_tx_{w}d", f"n{w}"), (f"sum_amount_{w}d", f"s{w}"))},
    "sumsq_amount_30d": "q30",
    "max_amount_30d": "mx30",
    "nb_fraud_known_30d": "kf",
}
TERMINAL_AGGREGATE_OF: Final[dict[str, str]] = {
    **{k: v for w in TERMINAL_WINDOWS for k, v in ((f"nb_tx_{w}d_delayed", f"n{w}"), (f"nb_fraud_{w}d_delayed", f"f{w}"))},
    "first_fraud_ts_delayed": "first",
    "last_fraud_ts_delayed": "last",
    "nb_tx_since_first_fraud_delayed": "nsf",
    "nb_tx_after_last_fraud_delayed": "nal",
}
# the same as (state key, aggregate key) pairs, for the comprehensions the online path runs per payment
_CUSTOMER_PAIRS: Final = tuple(CUSTOMER_AGGREGATE_OF.items())
_TERMINAL_PAIRS: Final = tuple(TERMINAL_AGGREGATE_OF.items())
_COUNT_SUM: Final = tuple((f"n{w}", f"s{w}") for w in CUSTOMER_WINDOWS)  # what a payment adds to


def add_payment(c: dict[str, V], amount: V) -> dict[str, V]:
    """Customer aggregates ``c`` (a fresh dict: updated in place, and returned) with one more
    payment of ``amount`` in every window.

    Counts gain 1, sums the amount, ``q30`` its square; ``mx30`` (the max of the *previous*
    payments) and ``kf`` (known frauds) do not change.
    """
    for n, s in _COUNT_SUM:
        c[n] = c[n] + 1.0
        c[s] = c[s] + amount
    c["q30"] = c["q30"] + amount * amount
    return c


def empty_customer_state() -> dict[str, float]:
    """A fresh state of a customer without payments."""
    return dict(_EMPTY_CUSTOMER)


def customer_state_aggregates(state: Mapping[str, float] | None) -> dict[str, float]:
    """The customer aggregates a state holds (its payments only; None = unseen customer)."""
    s = _EMPTY_CUSTOMER if state is None else state
    return {agg: s[key] for key, agg in _CUSTOMER_PAIRS}


def customer_aggregates(state: Mapping[str, float] | None, amount: float) -> dict[str, float]:
    """The customer aggregates of ``_derive`` for a payment of ``amount`` made after ``state``."""
    return add_payment(customer_state_aggregates(state), amount)


def cold_customer_aggregates(amount: np.ndarray) -> dict[str, np.ndarray]:
    """Column form of ``customer_aggregates(None, amount)``: each customer's windows hold only the payment."""
    empty = {agg: np.full_like(amount, _EMPTY_CUSTOMER[key]) for key, agg in CUSTOMER_AGGREGATE_OF.items()}
    return add_payment(empty, amount)


def terminal_aggregates(state: Mapping[str, float] | None) -> dict[str, float]:
    """The terminal aggregates of ``_derive`` from a terminal's state (None = unseen terminal)."""
    s = _EMPTY_TERMINAL if state is None else state
    return {agg: s[key] for key, agg in _TERMINAL_PAIRS}


def customer_state_columns(c: Mapping[str, np.ndarray], last_ts: np.ndarray) -> dict[str, np.ndarray]:
    """Batch aggregates (no payment being scored) -> the columns of customer states, in key order."""
    cols = {key: c[agg] for key, agg in CUSTOMER_AGGREGATE_OF.items()}
    cols["avg_amount_30d"] = _div_np(c["s30"], c["n30"], 0.0)
    cols["last_ts"] = last_ts
    return {key: cols[key] for key in CUSTOMER_STATE_KEYS}


def terminal_state_columns(tm: Mapping[str, np.ndarray], last_ts: np.ndarray) -> dict[str, np.ndarray]:
    """Batch aggregates -> the columns of terminal states, in key order."""
    cols = {key: tm[agg] for key, agg in TERMINAL_AGGREGATE_OF.items()}
    cols["last_ts"] = last_ts
    return {key: cols[key] for key in TERMINAL_STATE_KEYS}
