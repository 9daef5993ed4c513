"""Velocity: one definition, two callers (velocity_of online, payments_velocity in training) that agree exactly."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from scoring_service.core import features as F
from scoring_service.core.features.velocity import VELOCITY_WINDOWS_S, Velocity, payments_velocity, velocity_of
from scoring_service.training.simulator import simulate

T = 1_530_000_000.0  # 2018-06-26


def test_windows():
    assert VELOCITY_WINDOWS_S == {"1h": 3600.0, "1d": 86400.0}


def test_first_payment_of_a_card():
    assert velocity_of([], T) == Velocity(nb_tx_1h=1.0, nb_tx_1d=1.0, seconds_since_last=-1.0)


def test_window_bounds_are_t_minus_w_excluded_and_t_included():
    v = velocity_of([T - 3600.0, T - 3599.5, T - 86400.0, T - 86399.0, T], T)
    assert v.nb_tx_1h == 3.0  # T - 3599.5, T, and the payment itself
    assert v.nb_tx_1d == 5.0  # all but T - 86400
    assert v.seconds_since_last == 0.0  # a previous payment at the same time


def test_any_order_and_later_times_ignored():
    v = velocity_of([T + 5.0, T - 10.0, T - 4000.0, T - 30.0], T)
    assert v == Velocity(nb_tx_1h=3.0, nb_tx_1d=4.0, seconds_since_last=10.0)
    assert velocity_of([T + 1.0], T) == velocity_of([], T)


def _row_by_row(payments: pd.DataFrame) -> pd.DataFrame:
    """What the online path computes: each payment against its card's previous payments (the
    intraday list), times through the online time convention (epoch_seconds)."""
    seen: dict[str, list[float]] = defaultdict(list)
    rows = []
    for cid, ts in zip(payments["customer_id"], payments["timestamp"], strict=True):
        t = F.epoch_seconds(ts)
        v = velocity_of(seen[cid], t)
        rows.append((v.nb_tx_1h, v.nb_tx_1d, v.seconds_since_last))
        seen[cid].append(t)
    return pd.DataFrame(rows, columns=["nb_tx_1h", "nb_tx_1d", "seconds_since_last"], index=payments.index)


@pytest.fixture(scope="module")
def simulated() -> pd.DataFrame:
    # a high card-testing rate so the frame has bursts (ties in time within a card, up to ~30 an hour)
    sim = simulate(400, 800, "2018-04-01", 12, seed=4, card_testing_per_day=2e-3)
    return F.normalise_handbook(sim)


def test_online_and_batch_agree_exactly_on_a_simulated_frame(simulated):
    batch = payments_velocity(simulated)
    online = _row_by_row(simulated)
    assert list(batch.columns) == ["nb_tx_1h", "nb_tx_1d", "seconds_since_last"]
    assert batch.dtypes.eq("float64").all()
    pd.testing.assert_frame_equal(batch, online, check_exact=True)
    assert batch["nb_tx_1h"].max() >= 10  # the bursts are in it
    assert (batch["seconds_since_last"] == 0.0).any()  # and ties in time within a card
    assert (batch["nb_tx_1h"] >= 1).all() and (batch["nb_tx_1d"] >= batch["nb_tx_1h"]).all()


def test_agree_on_window_edges_ties_and_sub_second_times():
    base = pd.Timestamp("2018-07-01 12:00:00")
    offsets_s = [0, 0, 0.000001, 3599.999999, 3600, 3600, 3600.5, 7200, 86400, 86400.000001, 90000, 172800.25]
    rows = [("a", base + pd.Timedelta(seconds=s)) for s in offsets_s]
    rows += [("b", base + pd.Timedelta(seconds=s)) for s in (1, 3601, 3601, 90001)]
    df = pd.DataFrame(rows, columns=["customer_id", "timestamp"]).sort_values("timestamp", kind="stable")
    df.index = df.index * 10 + 7  # any index: the result keeps it
    batch = payments_velocity(df)
    pd.testing.assert_frame_equal(batch, _row_by_row(df), check_exact=True)
    a = batch[df["customer_id"] == "a"]
    # the second payment at 3600 s: the one at 0 s is out (t - w < t_j), the ones after it are in,
    # the earlier one at 3600 s too (ties: earlier rows count)
    assert a["nb_tx_1h"].tolist()[5] == 4.0  # 0.000001, 3599.999999, the first 3600 and itself
    assert a["seconds_since_last"].tolist()[:2] == [-1.0, 0.0]


def test_empty_frame():
    empty = pd.DataFrame({"customer_id": pd.Series([], dtype=object), "timestamp": pd.Series([], dtype="datetime64[ns]")})
    out = payments_velocity(empty)
    assert len(out) == 0 and list(out.columns) == ["nb_tx_1h", "nb_tx_1d", "seconds_since_last"]


def test_exported_from_the_features_package():
    assert F.Velocity is Velocity and F.velocity_of is velocity_of and F.payments_velocity is payments_velocity


def test_handbook_like_customers_rarely_pay_more_than_a_few_times_an_hour():
    payments = F.normalise_handbook(simulate(1000, 2000, "2018-04-01", 20, seed=1, card_testing_per_day=0))
    v = payments_velocity(payments)
    assert np.quantile(v["nb_tx_1h"], 0.999) <= 4
