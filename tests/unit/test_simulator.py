"""Simulator: the handbook file's columns and dtypes, determinism, the three fraud scenarios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scoring_service.training.simulator import COLUMNS, simulate


@pytest.fixture(scope="module")
def sim() -> pd.DataFrame:
    return simulate(1500, 3000, "2018-04-01", 40, seed=7)


def test_columns_and_dtypes(sim):
    assert list(sim.columns) == COLUMNS
    expected = {"TRANSACTION_ID": "int64", "TX_DATETIME": "datetime64[ns]", "CUSTOMER_ID": "int64", "TERMINAL_ID": "int64",
                "TX_AMOUNT": "float64", "TX_TIME_SECONDS": "int64", "TX_TIME_DAYS": "int64", "TX_FRAUD": "int64"}
    assert {c: str(t) for c, t in sim.dtypes.items()} == expected
    assert sim["TX_DATETIME"].is_monotonic_increasing
    assert (sim["TRANSACTION_ID"].to_numpy() == np.arange(len(sim))).all()
    start = pd.Timestamp("2018-04-01")
    secs = (sim["TX_DATETIME"] - start).dt.total_seconds().astype("int64")
    assert (secs == sim["TX_TIME_SECONDS"]).all()
    assert (sim["TX_TIME_DAYS"] == sim["TX_TIME_SECONDS"] // 86400).all()
    assert sim["TX_TIME_DAYS"].between(0, 39).all()
    assert (sim["TX_AMOUNT"] >= 0).all()
    assert set(sim["TX_FRAUD"].unique()) <= {0, 1}


def test_volumes_like_the_handbook(sim):
    per_customer_day = len(sim) / 1500 / 40  # handbook: ~1.9 payments per customer per day
    assert 1.5 < per_customer_day < 2.3
    assert 0.002 < sim["TX_FRAUD"].mean() < 0.03
    assert sim["CUSTOMER_ID"].nunique() > 1400
    # customers pay at several terminals near them, each terminal sees several customers
    assert sim.groupby("CUSTOMER_ID")["TERMINAL_ID"].nunique().median() >= 3


def test_deterministic():
    a = simulate(300, 600, "2018-04-01", 10, seed=1)
    b = simulate(300, 600, "2018-04-01", 10, seed=1)
    c = simulate(300, 600, "2018-04-01", 10, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["TX_AMOUNT"].equals(c["TX_AMOUNT"]) if len(a) == len(c) else True


def test_fraud_scenarios(sim):
    # 1: every amount over 220 is fraud
    assert (sim.loc[sim["TX_AMOUNT"] > 220, "TX_FRAUD"] == 1).all()
    # 2: compromised terminals: a terminal with >= 5 frauds at normal amounts is fraudulent on
    # (almost) all its payments between its first fraud and 28 days later
    normal = sim[(sim["TX_AMOUNT"] <= 220)]
    fr = normal[normal["TX_FRAUD"] == 1]
    counts = fr.groupby("TERMINAL_ID").size()
    terms = counts[counts >= 5].index
    assert len(terms) > 0
    rates = []
    for t in terms:
        rows = sim[sim["TERMINAL_ID"] == t]
        first = rows.loc[rows["TX_FRAUD"] == 1, "TX_TIME_DAYS"].min()
        inside = rows[(rows["TX_TIME_DAYS"] >= first) & (rows["TX_TIME_DAYS"] < first + 28)]
        rates.append(inside["TX_FRAUD"].mean())
    assert np.median(rates) > 0.9
    # 3: compromised customers: frauds at terminals with no other fraud are the x5 ones
    all_fr = sim[sim["TX_FRAUD"] == 1]
    per_term = all_fr.groupby("TERMINAL_ID").size()
    lone = all_fr[all_fr["TERMINAL_ID"].map(per_term) == 1]
    usual = sim[sim["TX_FRAUD"] == 0].groupby("CUSTOMER_ID")["TX_AMOUNT"].median()
    ratio = (lone["TX_AMOUNT"] / lone["CUSTOMER_ID"].map(usual)).dropna()
    assert len(ratio) > 20
    assert 3.0 < ratio.median() < 7.0
    # ... and such a customer has several frauds within 14 days
    per_cust = lone.groupby("CUSTOMER_ID")["TX_TIME_DAYS"].agg(["min", "max", "size"])
    assert (per_cust["max"] - per_cust["min"] < 14).mean() > 0.9


def test_fast_enough_to_use_in_tests():
    df = simulate(5000, 10000, "2018-04-01", 60, seed=0)
    assert len(df) > 400_000
