"""Simulator: the handbook file's columns and dtypes (then the scenario column), determinism, the four fraud scenarios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scoring_service.training import simulator
from scoring_service.training.simulator import COLUMNS, SCENARIO_COLUMN, simulate


@pytest.fixture(scope="module")
def sim() -> pd.DataFrame:
    return simulate(1500, 3000, "2018-04-01", 40, seed=7)


def test_columns_and_dtypes(sim):
    assert list(sim.columns) == [*COLUMNS, SCENARIO_COLUMN]  # the handbook file's columns first
    expected = {"TRANSACTION_ID": "int64", "TX_DATETIME": "datetime64[ns]", "CUSTOMER_ID": "int64", "TERMINAL_ID": "int64",
                "TX_AMOUNT": "float64", "TX_TIME_SECONDS": "int64", "TX_TIME_DAYS": "int64", "TX_FRAUD": "int64",
                "TX_FRAUD_SCENARIO": "int8"}
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
    # 3: compromised customers: frauds at terminals with no other fraud are the x5 ones (card
    # testing, scenario 4, also leaves lone frauds at random terminals: tested apart below)
    all_fr = sim[(sim["TX_FRAUD"] == 1) & (sim[SCENARIO_COLUMN] != simulator.CARD_TESTING)]
    per_term = all_fr.groupby("TERMINAL_ID").size()
    lone = all_fr[all_fr["TERMINAL_ID"].map(per_term) == 1]
    usual = sim[sim["TX_FRAUD"] == 0].groupby("CUSTOMER_ID")["TX_AMOUNT"].median()
    ratio = (lone["TX_AMOUNT"] / lone["CUSTOMER_ID"].map(usual)).dropna()
    assert len(ratio) > 20
    assert 3.0 < ratio.median() < 7.0
    # ... and such a customer has several frauds within 14 days
    per_cust = lone.groupby("CUSTOMER_ID")["TX_TIME_DAYS"].agg(["min", "max", "size"])
    assert (per_cust["max"] - per_cust["min"] < 14).mean() > 0.9


def test_scenario_column_says_why_a_payment_is_fraud(sim):
    scenario = sim[SCENARIO_COLUMN]
    assert ((scenario > 0) == (sim["TX_FRAUD"] == 1)).all()
    assert set(scenario.unique()) == {0, 1, 2, 3, 4}
    # scenario 1 judges the amount as drawn: a payment over 220 is 1, or 3 when the x5 made it so
    # (2 when that x5 payment was at a compromised terminal too: the first scenario is kept)
    assert scenario[sim["TX_AMOUNT"] > 220].isin([1, 2, 3]).all()
    assert (scenario[sim["TX_AMOUNT"] > 220] == 1).mean() > 0.2
    assert (sim.loc[scenario == 1, "TX_AMOUNT"] > 220).all()


def _bursts(sim: pd.DataFrame) -> pd.DataFrame:
    """Per card and day, its card-testing payments: how many small and large, and their time spans."""
    ct = sim[sim[SCENARIO_COLUMN] == simulator.CARD_TESTING].assign(small=lambda d: d["TX_AMOUNT"] <= 5.0)
    t = ct["TX_TIME_SECONDS"]
    return ct.assign(t_small=t.where(ct["small"]), t_large=t.where(~ct["small"])).groupby(
        ["CUSTOMER_ID", "TX_TIME_DAYS"]).agg(
        n_small=("small", "sum"), n=("small", "size"), n_terminals=("TERMINAL_ID", "nunique"),
        first_small=("t_small", "min"), last_small=("t_small", "max"), first_large=("t_large", "min"),
        last_large=("t_large", "max"), min_amount=("TX_AMOUNT", "min"), max_amount=("TX_AMOUNT", "max"),
    )


def test_card_testing_bursts_have_the_documented_shape():
    sim = simulate(5000, 10000, "2018-04-01", 30, seed=3)
    ct = sim[sim[SCENARIO_COLUMN] == simulator.CARD_TESTING]
    assert (ct["TX_FRAUD"] == 1).all()
    small, large = ct[ct["TX_AMOUNT"] <= 5.0], ct[ct["TX_AMOUNT"] > 5.0]
    assert small["TX_AMOUNT"].between(0.5, 5.0).all() and large["TX_AMOUNT"].between(50.0, 200.0).all()
    b = _bursts(sim)
    # ~1 card per 5,000 customers a day: 30 expected (Poisson); a few bursts may share a card and day
    assert 15 <= len(b) <= 50
    # a payment of a burst may fall on a compromised terminal (labelled 2): allow one or two missing
    n_large = b["n"] - b["n_small"]
    assert b["n_small"].between(8, 25).all() and (b["n_small"] >= 10).mean() > 0.9
    assert n_large.between(0, 5).all() and (n_large >= 2).mean() > 0.9
    assert (b["last_small"] - b["first_small"] < 600).all()  # the burst: within 10 minutes
    after = b.dropna(subset=["first_large"])
    assert (after["first_large"] >= after["last_small"]).all()  # small ones first, then large
    assert (after["last_large"] - after["first_small"] < 600 + 3600).all()  # the large ones: within the next hour
    assert (b["n_terminals"] >= 0.8 * b["n"]).mean() > 0.9  # random terminals, not the card's few
    # the velocity the online rules see: a tested card reaches >= 10 payments in an hour
    from scoring_service.core.features import normalise_handbook, payments_velocity

    pay = normalise_handbook(sim)
    v = payments_velocity(pay)["nb_tx_1h"].to_numpy()
    scenario = sim.loc[np.argsort(sim["TX_DATETIME"].to_numpy(), kind="stable"), SCENARIO_COLUMN].to_numpy()
    assert v[scenario == simulator.CARD_TESTING].max() >= 15
    assert np.quantile(v[scenario == 0], 0.999) <= 4


def test_card_testing_can_be_switched_off_and_leaves_the_other_scenarios_alone():
    with_ct = simulate(1000, 2000, "2018-04-01", 20, seed=5)
    without = simulate(1000, 2000, "2018-04-01", 20, seed=5, card_testing_per_day=0)
    assert (with_ct[SCENARIO_COLUMN] == simulator.CARD_TESTING).sum() > 0
    assert (without[SCENARIO_COLUMN] == simulator.CARD_TESTING).sum() == 0
    # scenario 4 draws from its own stream: the payments of scenarios 0-3 are the same either way
    key = ["TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD", SCENARIO_COLUMN]
    base = with_ct[with_ct[SCENARIO_COLUMN] != simulator.CARD_TESTING][key]
    merged = without[key].merge(base, how="left", indicator=True)
    assert (merged["_merge"] == "both").all()
    assert len(with_ct) - len(without) >= (with_ct[SCENARIO_COLUMN] == simulator.CARD_TESTING).sum()


def test_card_testing_is_deterministic():
    a = simulate(1000, 2000, "2018-04-01", 20, seed=11, card_testing_per_day=1e-3)
    b = simulate(1000, 2000, "2018-04-01", 20, seed=11, card_testing_per_day=1e-3)
    pd.testing.assert_frame_equal(a, b)
    assert (a[SCENARIO_COLUMN] == simulator.CARD_TESTING).sum() > 100


def test_fast_enough_to_use_in_tests():
    df = simulate(5000, 10000, "2018-04-01", 60, seed=0)
    assert len(df) > 400_000
