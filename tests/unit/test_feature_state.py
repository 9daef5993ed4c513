"""The entity-state schema (a stored format) and the feature package's public names and layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd

from scoring_service.core import features as F
from scoring_service.core.features import state as S

# The key names are stored in the cache (CacheEntry.state JSON): renaming one is a format change.
STORED_CUSTOMER_KEYS = [
    "nb_tx_1d", "sum_amount_1d", "nb_tx_7d", "sum_amount_7d", "nb_tx_30d", "sum_amount_30d", "sumsq_amount_30d",
    "max_amount_30d", "avg_amount_30d", "nb_fraud_known_30d", "last_ts",
]
STORED_TERMINAL_KEYS = [
    "nb_tx_1d_delayed", "nb_fraud_1d_delayed", "nb_tx_7d_delayed", "nb_fraud_7d_delayed", "nb_tx_14d_delayed",
    "nb_fraud_14d_delayed", "nb_tx_30d_delayed", "nb_fraud_30d_delayed", "first_fraud_ts_delayed", "last_fraud_ts_delayed",
    "nb_tx_since_first_fraud_delayed", "nb_tx_after_last_fraud_delayed", "last_ts",
]


def _payments() -> pd.DataFrame:
    rows = [
        ("c1", "t1", 10.0, "2018-05-01 08:00", 1),
        ("c2", "t1", 30.0, "2018-05-02 09:00", 0),
        ("c1", "t2", 20.0, "2018-05-10 07:00", 0),
        ("c1", "t1", 60.0, "2018-05-10 12:00", 0),
    ]
    df = pd.DataFrame(rows, columns=["customer_id", "terminal_id", "amount", "timestamp", "is_fraud"])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    df["transaction_id"] = [str(i) for i in range(len(df))]
    df["is_fraud"] = df["is_fraud"].astype("int8")
    return df


def test_the_schema_names_every_stored_key_in_order():
    assert list(F.CUSTOMER_STATE_KEYS) == STORED_CUSTOMER_KEYS
    assert list(F.TERMINAL_STATE_KEYS) == STORED_TERMINAL_KEYS
    assert list(S.EMPTY_CUSTOMER_STATE) == STORED_CUSTOMER_KEYS
    assert list(S.EMPTY_TERMINAL_STATE) == STORED_TERMINAL_KEYS
    # every key is an aggregate of _derive, or one of the state's own
    assert set(S.CUSTOMER_AGGREGATE_OF) | {"avg_amount_30d", "last_ts"} == set(STORED_CUSTOMER_KEYS)
    assert set(S.TERMINAL_AGGREGATE_OF) | {"last_ts"} == set(STORED_TERMINAL_KEYS)
    assert len(set(S.CUSTOMER_AGGREGATE_OF.values())) == len(S.CUSTOMER_AGGREGATE_OF)
    assert len(set(S.TERMINAL_AGGREGATE_OF.values())) == len(S.TERMINAL_AGGREGATE_OF)


def test_every_producer_of_states_follows_the_schema():
    cs, ts = F.entity_states(_payments(), pd.Timestamp("2018-05-11"))
    assert {tuple(s) for s in cs.values()} == {tuple(STORED_CUSTOMER_KEYS)}
    assert {tuple(s) for s in ts.values()} == {tuple(STORED_TERMINAL_KEYS)}
    json.dumps([cs, ts])
    new = F.advance_customer_state(None, 12.0, "2018-05-11T10:00:00")
    assert list(new) == STORED_CUSTOMER_KEYS
    assert new["nb_tx_30d"] == 1.0 and new["avg_amount_30d"] == new["max_amount_30d"] == 12.0
    advanced = F.advance_customer_state(cs["c1"], 30.0, "2018-05-11T10:00:00")
    assert list(advanced) == STORED_CUSTOMER_KEYS
    assert advanced["nb_tx_30d"] == cs["c1"]["nb_tx_30d"] + 1 and advanced["max_amount_30d"] == 60.0
    assert advanced["nb_fraud_known_30d"] == cs["c1"]["nb_fraud_known_30d"]


def test_an_empty_state_is_an_unseen_entity():
    t = pd.Timestamp("2018-05-11 10:00")
    unseen = F.online_features(25.0, t, None, None)
    empty = F.online_features(25.0, t, dict(S.EMPTY_CUSTOMER_STATE), dict(S.EMPTY_TERMINAL_STATE))
    np.testing.assert_array_equal(unseen, empty)
    assert S.customer_aggregates(None, 25.0) == {"n1": 1.0, "s1": 25.0, "n7": 1.0, "s7": 25.0, "n30": 1.0, "s30": 25.0,
                                                 "q30": 625.0, "mx30": 0.0, "kf": 0.0}
    cold = S.cold_customer_aggregates(np.array([25.0, 3.0]))
    assert {k: v[0] for k, v in cold.items()} == S.customer_aggregates(None, 25.0)


def test_windows():
    assert F.FEATURE_WINDOW_DAYS == 30 == max(F.CUSTOMER_WINDOWS)
    assert max(F.TERMINAL_WINDOWS) <= F.FEATURE_WINDOW_DAYS and F.CUSTOMER_FRAUD_WINDOW <= F.FEATURE_WINDOW_DAYS


def test_public_names_callers_use():
    from scoring_service.core.features import (  # noqa: F401
        FEATURE_NAMES,
        LABEL_DELAY_DAYS,
        N_FEATURES,
        advance_customer_state,
        entity_states,
        epoch_seconds,
        handbook_features,
        normalise_handbook,
        online_features,
        online_features_many,
        payments_features,
        payments_features_cold_customer,
    )

    assert N_FEATURES == len(FEATURE_NAMES) == 26
    assert all(hasattr(F, name) for name in F.__all__)


def test_the_feature_package_imports_nothing_of_ours_outside_core():
    root = Path(F.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            for m in mods:
                assert not m.startswith("scoring_service") or m.startswith("scoring_service.core"), f"{path.name}: {m}"
