"""Feature module: batch/online parity on real payments, window semantics, no label leakage."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring_service.core import features as F
from scoring_service.training.simulator import simulate

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HANDBOOK = REPO.parent / "shared" / "data" / "handbook" / "transactions-2018-04-01_2018-08-31.parquet"


def handbook_path() -> Path:
    return Path(os.environ.get("FRAUDSCORE_HANDBOOK", str(DEFAULT_HANDBOOK)))


@pytest.fixture(scope="module")
def payments() -> pd.DataFrame:
    """The first 45 days of the handbook file (features of a prefix are those of the whole file),
    or simulated payments when the file is absent (said loudly)."""
    path = handbook_path()
    if path.is_file():
        df = pd.read_parquet(path, filters=[("TX_DATETIME", "<", pd.Timestamp("2018-05-21"))])
    else:
        msg = f"handbook file {path} not found (set FRAUDSCORE_HANDBOOK): using simulated payments"
        warnings.warn(msg, stacklevel=1)
        print(msg)
        df = simulate(2000, 4000, "2018-04-01", 50, seed=1)
    return F.normalise_handbook(df)


@pytest.fixture(scope="module")
def feats(payments) -> pd.DataFrame:
    return F.payments_features(payments)


def test_shape_dtype_index(payments, feats):
    assert list(feats.columns) == F.FEATURE_NAMES
    assert len(F.FEATURE_NAMES) == len(set(F.FEATURE_NAMES))
    assert (feats.index == payments.index).all()
    assert all(feats.dtypes == np.float32)
    assert np.isfinite(feats.to_numpy()).all()


def test_parity_online_vs_batch(payments, feats):
    """online_features(states as of just before the payment) == the payments_features row."""
    rng = np.random.default_rng(0)
    t = payments["timestamp"]
    late = np.flatnonzero((t >= t.iloc[0] + pd.Timedelta(days=46)).to_numpy())
    idx = rng.choice(late, size=200, replace=False)
    # payments at terminals with known frauds are the interesting ones: add some
    risky = np.flatnonzero(feats["terminal_nb_fraud_30d"].to_numpy() > 0)
    risky = risky[risky >= late[0]]
    if len(risky):
        idx = np.r_[idx, rng.choice(risky, size=min(100, len(risky)), replace=False)]
    cust = payments["customer_id"].to_numpy()
    term = payments["terminal_id"].to_numpy()
    by_cust = payments.groupby("customer_id").indices
    by_term = payments.groupby("terminal_id").indices
    X = feats.to_numpy()
    checked_fraud_terms = 0
    for i in idx:
        pos = np.union1d(by_cust[cust[i]], by_term[term[i]])
        sub = payments.iloc[pos[pos < i]]  # every earlier payment of the same customer or terminal
        cs, ts = F.entity_states(sub, t.iloc[i])
        row = payments.iloc[i]
        online = F.online_features(row["amount"], row["timestamp"], cs.get(cust[i]), ts.get(term[i]))
        assert online.dtype == np.float32 and online.shape == (len(F.FEATURE_NAMES),)
        np.testing.assert_allclose(online, X[i], rtol=1e-5, atol=1e-4, err_msg=f"payment {i}")
        if ts.get(term[i], {}).get("nb_fraud_30d_delayed", 0) > 0:
            checked_fraud_terms += 1
    if len(risky):
        assert checked_fraud_terms > 0
    # online_features_many == online_features one by one, and float timestamps agree
    rows = []
    for i in idx[:20]:
        pos = np.union1d(by_cust[cust[i]], by_term[term[i]])
        cs, ts = F.entity_states(payments.iloc[pos[pos < i]], t.iloc[i])
        rows.append((payments["amount"].iloc[i], t.iloc[i].to_pydatetime(), cs.get(cust[i]), ts.get(term[i])))
    many = F.online_features_many(rows)
    assert many.shape == (20, len(F.FEATURE_NAMES))
    np.testing.assert_allclose(many, X[idx[:20]], rtol=1e-5, atol=1e-4)
    secs = [(a, pd.Timestamp(ts).value / 1e9, c, tt) for a, ts, c, tt in rows]
    np.testing.assert_array_equal(F.online_features_many(secs), many)


def _frame(rows):
    df = pd.DataFrame(rows, columns=["customer_id", "terminal_id", "amount", "timestamp", "is_fraud"])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    df["transaction_id"] = [str(i) for i in range(len(df))]
    df["is_fraud"] = df["is_fraud"].astype("int8")
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def test_windows_hand_computed():
    df = _frame(
        [
            ("c1", "t1", 10.0, "2018-05-01 08:00", 1),
            ("c2", "t1", 30.0, "2018-05-02 09:00", 0),
            ("c1", "t2", 20.0, "2018-05-10 07:00", 0),
            ("c1", "t1", 60.0, "2018-05-10 12:00", 0),  # Thursday
            ("c1", "t1", 50.0, "2018-05-12 03:00", 0),  # Saturday night
        ]
    )
    X = F.payments_features(df)
    r = X.iloc[3]
    assert r["customer_nb_tx_1d"] == 2 and r["customer_avg_amount_1d"] == pytest.approx(40.0)
    assert r["customer_nb_tx_30d"] == 3 and r["customer_avg_amount_30d"] == pytest.approx(30.0)
    assert r["amount_ratio_avg_30d"] == pytest.approx(60.0 / 15.0)
    assert r["amount_ratio_max_30d"] == pytest.approx(60.0 / 20.0)
    # terminal t1: payments of 05-01 and 05-02 are older than 7 days at 05-10 12:00
    assert r["terminal_nb_tx_7d"] == 2 and r["terminal_risk_7d"] == pytest.approx(0.5)
    assert r["terminal_nb_tx_1d"] == 0 and r["terminal_risk_1d"] == 0
    assert r["terminal_nb_fraud_30d"] == 1
    assert r["terminal_days_since_last_fraud"] == pytest.approx(9 + 4 / 24, rel=1e-5)
    assert r["customer_nb_fraud_known_30d"] == 1  # c1's fraud of 05-01 is older than 7 days
    assert r["terminal_risk_since_first_fraud"] == pytest.approx(0.5)  # fraud, then one genuine
    assert r["terminal_nb_tx_after_last_fraud"] == 1
    assert X.iloc[2]["terminal_nb_tx_after_last_fraud"] == -1  # t2: no known fraud
    assert r["is_weekend"] == 0 and r["is_night"] == 0
    r = X.iloc[4]
    assert r["is_weekend"] == 1 and r["is_night"] == 1
    # first payments of an entity
    r0 = X.iloc[0]
    assert r0["customer_nb_tx_30d"] == 1 and r0["amount_ratio_avg_30d"] == 1.0 and r0["terminal_nb_tx_30d"] == 0
    assert r0["terminal_days_since_last_fraud"] == 60.0


def test_no_label_leakage(payments):
    """Labels younger than LABEL_DELAY_DAYS never change a payment's features."""
    sub = payments.iloc[: len(payments) // 3].copy()
    X = F.payments_features(sub)
    t = sub["timestamp"]
    cut = t.iloc[-1] - pd.Timedelta(days=F.LABEL_DELAY_DAYS)
    flipped = sub.copy()
    recent = (t > cut).to_numpy()
    flipped.loc[recent, "is_fraud"] = (1 - flipped.loc[recent, "is_fraud"].clip(0, 1)).astype("int8")
    X2 = F.payments_features(flipped)
    last = (t == t.iloc[-1]).to_numpy()
    np.testing.assert_array_equal(X.to_numpy()[last], X2.to_numpy()[last])
    # unknown labels (-1 / absent) count as not-fraud
    nolab = sub.drop(columns=["is_fraud"])
    X3 = F.payments_features(nolab)
    assert (X3["terminal_nb_fraud_30d"] == 0).all()


def test_entity_states(payments):
    as_of = payments["timestamp"].iloc[-1]
    cs, ts = F.entity_states(payments, as_of)
    recent = payments[payments["timestamp"] > as_of - pd.Timedelta(days=30)]
    assert set(recent["customer_id"]) <= set(cs)
    longest = F.LABEL_DELAY_DAYS + F.CUSTOMER_FRAUD_WINDOW
    assert set(cs) <= set(payments.loc[payments["timestamp"] > as_of - pd.Timedelta(days=longest), "customer_id"])
    assert set(recent["terminal_id"]) <= set(ts)
    json.dumps([cs, ts])  # plain floats
    c_id = recent["customer_id"].iloc[0]
    mine = recent[recent["customer_id"] == c_id]
    st = cs[c_id]
    assert st["nb_tx_30d"] == len(mine)
    assert st["sum_amount_30d"] == pytest.approx(mine["amount"].sum())
    assert st["avg_amount_30d"] == pytest.approx(mine["amount"].mean())
    for key in ("nb_tx_1d", "nb_tx_7d", "sum_amount_1d", "sum_amount_7d", "max_amount_30d", "nb_fraud_known_30d"):
        assert isinstance(st[key], float)


def test_advance_customer_state_matches_batch(payments, feats):
    """A customer's state advanced payment by payment gives the batch features (within windows)."""
    t = payments["timestamp"]
    # a customer's first 20 hours in the data: no window of the batch features expires in them
    c_id = payments["customer_id"].iloc[0]
    mine = np.flatnonzero((payments["customer_id"] == c_id).to_numpy())
    last_day = mine[(t.iloc[mine] < t.iloc[mine[0]] + pd.Timedelta(hours=20)).to_numpy()]
    assert len(last_day) >= 1
    state = None
    terms = payments["terminal_id"].to_numpy()
    for i in last_day:
        # terminal states as of this payment
        earlier = payments.iloc[:i]
        _, ts = F.entity_states(earlier[terms[:i] == terms[i]], t.iloc[i])
        f = F.online_features(payments["amount"].iloc[i], t.iloc[i], state, ts.get(payments["terminal_id"].iloc[i]))
        np.testing.assert_allclose(f, feats.to_numpy()[i], rtol=1e-5, atol=1e-4)
        state = F.advance_customer_state(state, payments["amount"].iloc[i], t.iloc[i])
    assert state["nb_tx_1d"] >= len(last_day)
    new = F.advance_customer_state(None, 0.0, t.iloc[0])  # zero amounts are valid
    assert new["nb_tx_30d"] == 1.0 and new["avg_amount_30d"] == 0.0


def test_unseen_entities_and_zero_amount():
    ts = pd.Timestamp("2018-05-05 10:00")
    f = F.online_features(0.0, ts, None, None)
    assert np.isfinite(f).all()
    df = _frame([("c", "t", 0.0, "2018-05-05 10:00", 0)])
    np.testing.assert_allclose(f, F.payments_features(df).to_numpy()[0])
    assert F.online_features_many([]).shape == (0, len(F.FEATURE_NAMES))
    g = F.online_features(25.0, ts.to_pydatetime(), None, None)
    assert g[F.FEATURE_NAMES.index("amount")] == 25.0
    assert g[F.FEATURE_NAMES.index("customer_nb_tx_30d")] == 1.0


def test_normalise_handbook_columns():
    df = simulate(200, 400, "2018-04-01", 5, seed=3)
    p = F.normalise_handbook(df.sample(frac=1.0, random_state=0))
    assert list(p.columns) == ["transaction_id", "customer_id", "terminal_id", "amount", "timestamp", "is_fraud"]
    assert p["timestamp"].is_monotonic_increasing
    assert p["is_fraud"].dtype == np.int8 and p["customer_id"].map(type).eq(str).all()
    assert str(p["timestamp"].dtype) == "datetime64[ns]"


def test_cold_customer_features_match_online_with_unseen_customer(payments):
    sub = payments.iloc[: len(payments) // 4]
    cold = F.payments_features_cold_customer(sub).to_numpy()
    term = sub["terminal_id"].to_numpy()
    for i in np.random.default_rng(1).choice(len(sub), 30, replace=False):
        _, ts = F.entity_states(sub.iloc[:i][term[:i] == term[i]], sub["timestamp"].iloc[i])
        f = F.online_features(sub["amount"].iloc[i], sub["timestamp"].iloc[i], None, ts.get(term[i]))
        np.testing.assert_allclose(f, cold[i], rtol=1e-5, atol=1e-4)


def test_epoch_seconds_reads_every_time_form_the_clis_accept():
    import datetime as dt

    epoch_seconds = F.epoch_seconds
    t = 1535760000.0  # 2018-09-01T00:00:00Z
    assert epoch_seconds("2018-09-01") == t
    assert epoch_seconds("2018-09-01T02:00:00+02:00") == t
    assert epoch_seconds("1535760000.5") == t + 0.5
    assert epoch_seconds(pd.Timestamp("2018-09-01 00:00:00.0000019")) == t + 0.000001  # microsecond truncation
    assert epoch_seconds(dt.datetime(2018, 9, 1, tzinfo=dt.UTC)) == t
    for bad in ("yesterday", "", "NaT"):
        with pytest.raises(ValueError):
            epoch_seconds(bad)
