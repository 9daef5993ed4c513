"""The one feature module: training, the nightly batch and the online path all use it.

* ``definitions``: the windows, ``FEATURE_NAMES``, the time convention (:func:`epoch_seconds`)
  and ``_derive``, the single definition of every derived feature;
* ``state``: the entity-state schema (``CustomerState``, ``TerminalState``: a stored format) and
  its mapping to the raw aggregates ``_derive`` takes;
* ``batch``: every payment of a frame at once (training, backtests) and entity states as of a
  time (the nightly cache);
* ``online``: one payment from the cached states of its customer and terminal.

Batch and online features of the same payment are equal (tests/unit/test_features.py).
"""

from __future__ import annotations

from scoring_service.core.features.batch import (
    entity_states,
    handbook_features,
    normalise_handbook,
    payments_features,
    payments_features_cold_customer,
)
from scoring_service.core.features.definitions import (
    CUSTOMER_FRAUD_WINDOW,
    CUSTOMER_WINDOWS,
    FEATURE_NAMES,
    FEATURE_WINDOW_DAYS,
    LABEL_DELAY_DAYS,
    N_FEATURES,
    TERMINAL_WINDOWS,
    epoch_seconds,
)
from scoring_service.core.features.online import OnlineRow, advance_customer_state, online_features, online_features_many
from scoring_service.core.features.state import CUSTOMER_STATE_KEYS, TERMINAL_STATE_KEYS, CustomerState, TerminalState
from scoring_service.core.features.velocity import Velocity, payments_velocity, velocity_of

__all__ = [
    "CUSTOMER_FRAUD_WINDOW",
    "CUSTOMER_STATE_KEYS",
    "CUSTOMER_WINDOWS",
    "FEATURE_NAMES",
    "FEATURE_WINDOW_DAYS",
    "LABEL_DELAY_DAYS",
    "N_FEATURES",
    "TERMINAL_STATE_KEYS",
    "TERMINAL_WINDOWS",
    "CustomerState",
    "OnlineRow",
    "TerminalState",
    "Velocity",
    "advance_customer_state",
    "entity_states",
    "epoch_seconds",
    "handbook_features",
    "normalise_handbook",
    "online_features",
    "online_features_many",
    "payments_features",
    "payments_features_cold_customer",
    "payments_velocity",
    "velocity_of",
]
