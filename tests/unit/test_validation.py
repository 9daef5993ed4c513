import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring_service.core.validation import (
    MAX_AMOUNT,
    MAX_CLOCK_SKEW_S,
    MAX_ID_LEN,
    MIN_TIMESTAMP,
    ValidationError,
    validate_payment,
    validation_reasons,
)

NOW = 1_790_000_000.0


def _ok(**over):
    args = dict(transaction_id="t1", customer_id="c1", terminal_id="m1", amount=10.0, currency="", timestamp=NOW - 5,
                attributes=None, default_currency="EUR", now=NOW)
    args.update(over)
    return validate_payment(**args)


def test_valid_payment_gets_default_currency():
    p = _ok()
    assert p.currency == "EUR" and p.amount == 10.0 and p.timestamp == NOW - 5


def test_zero_amount_is_a_valid_card_verification():
    assert _ok(amount=0.0).amount == 0.0


@pytest.mark.parametrize("amount", [-0.01, math.nan, math.inf, -math.inf, MAX_AMOUNT * (1 + 1e-15), 1e39, 1.7e308])
def test_bad_amounts_name_the_field(amount):
    with pytest.raises(ValidationError) as exc:
        _ok(amount=amount)
    assert exc.value.field == "transaction.amount"


def test_amount_bounds_are_inclusive_and_every_valid_amount_is_finite_in_float32():
    assert _ok(amount=MAX_AMOUNT).amount == MAX_AMOUNT
    assert _ok(amount=5e-324).amount == 5e-324  # subnormal: valid (it is 0 in float32)
    assert math.copysign(1.0, _ok(amount=-0.0).amount) == 1.0  # -0.0 is 0, stored as 0.0
    with pytest.raises(ValidationError, match=r"transaction.amount: must be at most 10,000,000, got 1e\+39"):
        _ok(amount=1e39)
    # what the features make of the largest amount: the amount, sums of 1,000 payments, squares
    assert np.isfinite(np.float32(MAX_AMOUNT)) and np.isfinite(np.float32(MAX_AMOUNT * 1000))
    assert np.isfinite(np.float32(MAX_AMOUNT**2 * 1000))


@pytest.mark.parametrize("field", ["transaction_id", "customer_id", "terminal_id"])
def test_missing_or_oversized_ids(field):
    with pytest.raises(ValidationError) as exc:
        _ok(**{field: ""})
    assert exc.value.field == f"transaction.{field}"
    with pytest.raises(ValidationError):
        _ok(**{field: "x" * (MAX_ID_LEN + 1)})


@pytest.mark.parametrize("ts", [0.0, 100.0, NOW + 2 * 86400])
def test_absurd_timestamps(ts):
    with pytest.raises(ValidationError) as exc:
        _ok(timestamp=ts)
    assert exc.value.field == "transaction.timestamp"


def test_missing_timestamp_means_now():
    assert _ok(timestamp=None).timestamp == NOW


def test_bad_currency_and_attributes():
    with pytest.raises(ValidationError, match="currency"):
        _ok(currency="euro")
    with pytest.raises(ValidationError, match="attributes"):
        _ok(attributes={str(i): "x" for i in range(100)})


@given(st.floats(allow_nan=True, allow_infinity=True) | st.floats(min_value=MAX_AMOUNT / 2, max_value=MAX_AMOUNT * 2))
def test_amount_rule_holds_for_every_float(amount):
    if math.isfinite(amount) and 0 <= amount <= MAX_AMOUNT:
        assert _ok(amount=amount).amount == amount
    else:
        with pytest.raises(ValidationError):
            _ok(amount=amount)


# ---- the scalar (online) and the vectorised (batch) forms of the rules agree
BASE = dict(transaction_id="t1", customer_id="c1", terminal_id="m1", amount=10.0, timestamp=NOW - 5)
RULE_CASES = [  # (overrides of BASE, the field reported; None = valid)
    ({}, None),
    ({"amount": 0.0}, None),  # a card verification
    ({"amount": -0.01}, "amount"),
    ({"amount": math.nan}, "amount"),
    ({"amount": math.inf}, "amount"),
    ({"amount": -math.inf}, "amount"),
    ({"amount": MAX_AMOUNT}, None),
    ({"amount": np.nextafter(MAX_AMOUNT, math.inf)}, "amount"),
    ({"amount": 1e39}, "amount"),  # finite in float64, infinite in the model's float32
    ({"amount": -0.0}, None),
    ({"amount": 5e-324}, None),
    ({"amount": 1e39, "timestamp": 0.0}, "amount"),
    ({"transaction_id": ""}, "transaction_id"),
    ({"customer_id": "c" * (MAX_ID_LEN + 1)}, "customer_id"),
    ({"customer_id": "c" * MAX_ID_LEN}, None),
    ({"terminal_id": " m1"}, "terminal_id"),
    ({"terminal_id": "m1 "}, "terminal_id"),
    ({"transaction_id": "t\n1"}, "transaction_id"),
    ({"customer_id": "c 1"}, None),  # inner spaces are printable
    ({"timestamp": 100.0}, "timestamp"),
    ({"timestamp": MIN_TIMESTAMP - 1}, "timestamp"),
    ({"timestamp": MIN_TIMESTAMP}, None),
    ({"timestamp": NOW + MAX_CLOCK_SKEW_S}, None),
    ({"timestamp": NOW + MAX_CLOCK_SKEW_S + 1}, "timestamp"),
    ({"customer_id": "", "amount": -1.0, "timestamp": 0.0}, "customer_id"),  # the first failing rule wins
    ({"amount": math.nan, "timestamp": 0.0}, "amount"),
]


def _scalar_reason(row: dict) -> str:
    try:
        _ok(**row, prefix="")
    except ValidationError as exc:
        return str(exc).split(", got ")[0]  # the scalar form also quotes the value
    return ""


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"transaction_id": [r["transaction_id"] for r in rows], "customer_id": [r["customer_id"] for r in rows],
                         "terminal_id": [r["terminal_id"] for r in rows], "amount": [r["amount"] for r in rows],
                         "ts_s": [r["timestamp"] for r in rows]})


@pytest.mark.parametrize(("over", "field"), RULE_CASES)
def test_scalar_and_vectorised_rules_agree(over, field):
    row = {**BASE, **over}
    scalar = _scalar_reason(row)
    vectorised = validation_reasons(_frame([row]), now=NOW)[0]
    assert scalar == vectorised
    assert (scalar.split(":")[0] if scalar else None) == field


def test_vectorised_rules_judge_each_row_on_its_own():
    rows = [{**BASE, **over} for over, _ in RULE_CASES]
    assert list(validation_reasons(_frame(rows), now=NOW)) == [_scalar_reason(r) for r in rows]
