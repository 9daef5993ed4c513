import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring_service.core.validation import MAX_ID_LEN, ValidationError, validate_payment

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


@pytest.mark.parametrize("amount", [-0.01, math.nan, math.inf, -math.inf])
def test_bad_amounts_name_the_field(amount):
    with pytest.raises(ValidationError) as exc:
        _ok(amount=amount)
    assert exc.value.field == "transaction.amount"


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


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_amount_rule_holds_for_every_float(amount):
    if math.isfinite(amount) and amount >= 0:
        assert _ok(amount=amount).amount == amount
    else:
        with pytest.raises(ValidationError):
            _ok(amount=amount)
