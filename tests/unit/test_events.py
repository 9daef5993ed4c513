"""Event encoding (the Kafka codec), validation (the online service's rules), window rules and the file source."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring_service.adapters.files.event_source import FileEventSource
from scoring_service.adapters.files.payments_file import PaymentsFileError, read_payments_file
from scoring_service.adapters.kafka import codec
from scoring_service.core import events
from scoring_service.core.validation import MAX_AMOUNT
from scoring_service.protos import events_pb2

NOW = 1_800_000_000.0


def _frame(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame({
        "transaction_id": [str(i) for i in range(n)],
        "customer_id": [str(i % 2) for i in range(n)],
        "terminal_id": [str(10 + i % 3) for i in range(n)],
        "amount": np.linspace(0.0, 100.0, n),
        "timestamp": pd.date_range("2018-08-01", periods=n, freq="h").astype("datetime64[ns]"),
        "is_fraud": np.array([0, 1, 0, -1, 0][:n], dtype=np.int8),
    })


def _msgs(frame: pd.DataFrame):
    return [("p", 0, i, m.key, m.value) for i, m in enumerate(codec.payment_messages(frame))]


def test_payment_roundtrip_keeps_values_and_microseconds():
    f = _frame()
    f.loc[2, "timestamp"] = pd.Timestamp("2018-08-01 02:00:00.123456")
    out = codec.decode_payments(_msgs(f), now=NOW)
    assert not out.rejected
    pd.testing.assert_frame_equal(out.frame, f[events.PAYMENT_COLUMNS].reset_index(drop=True))
    keys = [m.key for m in codec.payment_messages(f)]
    assert keys == [c.encode() for c in f["customer_id"]]  # keyed by customer


def test_zero_amount_is_valid_card_verification():
    f = _frame(1)
    f.loc[0, "amount"] = 0.0
    assert not codec.decode_payments(_msgs(f), now=NOW).rejected


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("customer_id", "", "customer_id: is required"),
        ("terminal_id", "t" * 129, "terminal_id: is longer than 128"),
        ("transaction_id", " x", "transaction_id: must be printable"),
        ("amount", -1.0, "amount: must be >= 0"),
        ("amount", math.inf, "amount: must be finite"),
        ("amount", math.nan, "amount: must be finite"),
        ("amount", MAX_AMOUNT * 1.000001, "amount: must be at most 10,000,000"),
        ("amount", 1e39, "amount: must be at most"),
    ],
)
def test_invalid_payments_are_rejected_with_reason(field, value, reason):
    e = events_pb2.PaymentEvent(transaction_id="t1", customer_id="c1", terminal_id="m1", amount=5.0)
    e.timestamp.FromSeconds(1_533_000_000)
    setattr(e, field, value)
    out = codec.decode_payments([("p", 3, 42, b"k", e.SerializeToString())], now=NOW)
    assert len(out.frame) == 0 and len(out.rejected) == 1
    r = out.rejected[0]
    assert reason in r.reason and (r.partition, r.offset, r.key) == (3, 42, b"k")
    with pytest.raises(events.EventError):
        codec.validate_payment_event(e, now=NOW)


def test_an_event_without_amount_is_a_dead_letter_and_zero_is_not():
    e = events_pb2.PaymentEvent(transaction_id="t1", customer_id="c1", terminal_id="m1")
    e.timestamp.FromSeconds(1_533_000_000)
    assert not e.HasField("amount")
    zero = events_pb2.PaymentEvent()
    zero.CopyFrom(e)
    zero.amount = 0.0  # sent explicitly: a card verification
    out = codec.decode_payments([("p", 0, 1, b"k", e.SerializeToString()), ("p", 0, 2, b"k", zero.SerializeToString())],
                                now=NOW)
    assert [r.reason for r in out.rejected] == ["amount: is required"] and out.rejected[0].offset == 1
    assert list(out.frame["amount"]) == [0.0]
    with pytest.raises(events.EventError, match="amount: is required"):
        codec.validate_payment_event(e, now=NOW)
    codec.validate_payment_event(zero, now=NOW)
    # the encoder always marks the amount present, 0 included
    ev = events_pb2.PaymentEvent.FromString(codec.encode_payment("t", "c", "m", 0.0, 1_533_000_000_000_000))
    assert ev.HasField("amount") and ev.amount == 0.0


def test_bad_timestamps_and_garbage_are_rejected():
    e = events_pb2.PaymentEvent(transaction_id="t1", customer_id="c1", terminal_id="m1", amount=5.0)
    no_ts = e.SerializeToString()
    e.timestamp.FromSeconds(int(NOW + 3 * 86400))
    future = e.SerializeToString()
    e.timestamp.FromSeconds(100)
    ancient = e.SerializeToString()
    values = [no_ts, future, ancient, b"\xff\xff garbage", None]
    out = codec.decode_payments([("p", 0, i, None, v) for i, v in enumerate(values)], now=NOW)
    assert len(out.frame) == 0
    reasons = [r.reason for r in out.rejected]
    assert sum("timestamp" in r for r in reasons) == 3 and sum("undecodable" in r for r in reasons) == 2


def test_labels_are_stamped_after_the_delay_and_future_ones_skipped():
    f = _frame()
    plan = codec.label_messages(f, 7, now=pd.Timestamp("2018-08-08 01:30").value / 1e9, max_future_s=0)
    # payments at 00:00..04:00 on 08-01, labels at +7 d; the one at 04:00 has no label (-1)
    assert plan.skipped_future == 2 and len(plan.messages) == 2
    labels, rejected = codec.decode_labels([("l", 0, i, m.key, m.value) for i, m in enumerate(plan.messages)])
    assert not rejected and list(labels["is_fraud"]) == [0, 1]
    pay_ms = f["timestamp"].iloc[0].value // 10**6
    assert plan.messages[0].timestamp_ms == pay_ms + 7 * 86_400_000


def test_attach_labels_sorts_and_dedups():
    f = _frame().iloc[::-1]
    f = pd.concat([f, f.iloc[:1]])
    labels = pd.DataFrame({"transaction_id": ["1"], "is_fraud": np.array([1], dtype=np.int8), "labelled_at_s": [0.0]})
    out = events.attach_labels(f.drop(columns=["is_fraud"]), labels)
    assert list(out["transaction_id"]) == ["0", "1", "2", "3", "4"]
    assert list(out["is_fraud"]) == [-1, 1, -1, -1, -1]


def test_window_from_frame_hides_labels_not_yet_arrived(tmp_path):
    f = _frame()
    start = pd.Timestamp("2018-08-01 01:00").value / 1e9
    end = pd.Timestamp("2018-08-08 02:30").value / 1e9
    w = events.window_from_frame(f, start, end, 7, now=NOW)
    assert list(w.payments["transaction_id"]) == ["1", "2", "3", "4"]
    assert list(w.payments["is_fraud"]) == [1, 0, -1, -1]  # 03:00 and 04:00 labels arrive after end
    path = tmp_path / "p.parquet"
    f.to_parquet(path)
    src = FileEventSource(path, label_delay_days=7)
    assert src.read_window(start, end).events_consumed == 4


def test_handbook_file_columns_are_normalised(tmp_path):
    hb = pd.DataFrame({"TRANSACTION_ID": [2, 1], "TX_DATETIME": pd.to_datetime(["2018-04-01 00:01", "2018-04-01 00:00"]),
                       "CUSTOMER_ID": [5, 6], "TERMINAL_ID": [7, 8], "TX_AMOUNT": [1.5, 0.0], "TX_FRAUD": [0, 1]})
    path = tmp_path / "hb.parquet"
    hb.to_parquet(path)
    out = read_payments_file(path)
    assert list(out["transaction_id"]) == ["1", "2"] and out["amount"].dtype == np.float64
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(bad)
    with pytest.raises(PaymentsFileError):
        read_payments_file(bad)


@settings(max_examples=60, deadline=None)
@given(
    tx=st.text(min_size=1, max_size=128).filter(lambda s: s.isprintable() and s == s.strip()),
    amount=st.floats(min_value=0, max_value=MAX_AMOUNT, allow_nan=False),
    secs=st.integers(min_value=946_684_800, max_value=int(NOW)),
)
def test_valid_events_roundtrip(tx, amount, secs):
    f = pd.DataFrame({"transaction_id": [tx], "customer_id": ["c"], "terminal_id": ["t"], "amount": [amount],
                      "timestamp": np.array([secs * 10**9], dtype="datetime64[ns]")})
    out = codec.decode_payments(_msgs(f), now=NOW)
    assert not out.rejected
    assert out.frame["transaction_id"][0] == tx and out.frame["amount"][0] == amount


def test_dead_letter_keeps_original_bytes():
    r = events.Rejected("fs.payments", 2, 7, b"key", b"value", "amount: must be finite")
    dl = events_pb2.DeadLetter()
    dl.ParseFromString(codec.dead_letter_value(r, "nightly", now=NOW))
    assert (dl.source_topic, dl.partition, dl.offset, dl.key, dl.value, dl.job) == (
        "fs.payments", 2, 7, b"key", b"value", "nightly")
    assert dl.reason == "amount: must be finite" and dl.rejected_at.seconds == int(NOW)
