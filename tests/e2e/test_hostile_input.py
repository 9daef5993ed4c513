"""Hostile input by property, through real gRPC against the real service.

Numbers at and past every bound, huge and odd strings, garbage and truncated bytes, batches at and
past their bound: every answer is OK or a status the caller can act on (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL, never a Python class name; an answer is OK exactly
when the service's own validation rules accept the request; and the service keeps serving.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring_service.core.validation import MAX_AMOUNT, MAX_ID_LEN, ValidationError, validate_payment
from scoring_service.protos import scoring_pb2

pytestmark = pytest.mark.e2e

ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
PYTHON_NAMES = ("Error", "Exception", "<class", "Traceback")
HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


@pytest.fixture(scope="module")
def channel(scorer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(scorer.address) as ch:
        yield ch


def _call(channel: grpc.Channel, method: str, body: bytes) -> tuple[grpc.StatusCode, str, bytes | None]:
    """Send raw bytes to a method: (status code, details, answer bytes)."""
    fn = channel.unary_unary(f"/fraudscore.v1.FraudScoring/{method}", request_serializer=None, response_deserializer=None)
    try:
        return grpc.StatusCode.OK, "", fn(body, timeout=5)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def _assert_acceptable(code: grpc.StatusCode, details: str) -> None:
    assert code in ACCEPTABLE, (code, details)
    assert not any(name in details for name in PYTHON_NAMES), details


# ------------------------------------------------------------------------------------ strategies
BOUNDARY_AMOUNTS = [0.0, -0.0, MAX_AMOUNT, math.nextafter(MAX_AMOUNT, math.inf), MAX_AMOUNT + 1, 1e39, 1.7976931348623157e308,
                    math.nan, math.inf, -math.inf, 5e-324, -5e-324, 2.2250738585072014e-308, -1e-300, 1e-45, 3.4e38, 3.5e38]
amounts = st.one_of(st.sampled_from(BOUNDARY_AMOUNTS), st.floats(), st.floats(min_value=0, max_value=MAX_AMOUNT * 1.01))
ids = st.one_of(
    st.sampled_from(["", "c", "x" * MAX_ID_LEN, "x" * (MAX_ID_LEN + 1), "x" * 10_000, " padded", "tab\there", "nul\x00",
                     "emoji-\U0001f4b3\U0001f525", "\u200b", "rtl-\u202e", "line\nbreak", "\x7f", "é" * MAX_ID_LEN]),
    st.text(max_size=200),
)
TIMES = ["unset", "now", "ancient", "zero", "future", "far-future", "negative-nanos"]


def _timestamp(kind: str) -> tuple[int, int] | None:
    now = int(time.time())
    return {"unset": None, "now": (now - 5, 0), "ancient": (5, 0), "zero": (0, 0), "future": (now + 3 * 86_400, 0),
            "far-future": (2**40, 999_999_999), "negative-nanos": (now - 60, -5)}[kind]


@st.composite
def score_requests(draw: st.DrawFn) -> scoring_pb2.ScoreRequest:
    tx = scoring_pb2.Transaction(
        transaction_id=draw(ids), customer_id=draw(ids), terminal_id=draw(st.sampled_from(["T1", "T2"]) | ids),
        currency=draw(st.sampled_from(["", "EUR", "USD", "eur", "EURO", "€"]) | st.text(max_size=4)),
    )
    if draw(st.integers(0, 9)):  # mostly present
        tx.amount = draw(amounts)
    ts = _timestamp(draw(st.sampled_from(TIMES)))
    if ts is not None:
        tx.timestamp.seconds, tx.timestamp.nanos = ts
    tx.attributes.update(draw(st.dictionaries(st.text(max_size=300), st.text(max_size=300), max_size=40)))
    return scoring_pb2.ScoreRequest(request_id=draw(st.sampled_from(["", "r" * 128, "r" * 129]) | st.text(max_size=20)),
                                    transaction=tx)


def _expected_field(r: scoring_pb2.ScoreRequest) -> str | None:
    """The field the service's rules refuse (None: valid), the way the servicer applies them."""
    if len(r.request_id) > 128:
        return "request_id"
    tx = r.transaction
    if not tx.HasField("amount"):
        return "transaction.amount"
    try:
        validate_payment(transaction_id=tx.transaction_id, customer_id=tx.customer_id, terminal_id=tx.terminal_id,
                         amount=tx.amount, currency=tx.currency,
                         timestamp=tx.timestamp.seconds + tx.timestamp.nanos / 1e9 if tx.HasField("timestamp") else None,
                         attributes=dict(tx.attributes), default_currency="EUR")
    except ValidationError as exc:
        return exc.field
    return None


# ------------------------------------------------------------------------------------ the properties
@HOSTILE
@given(r=score_requests())
def test_hostile_score_requests_get_ok_exactly_when_valid_else_invalid_argument(channel, r):
    code, details, answer = _call(channel, "Score", r.SerializeToString())
    _assert_acceptable(code, details)
    field = _expected_field(r)
    if field is None:
        assert code == grpc.StatusCode.OK, details
        resp = scoring_pb2.ScoreResponse.FromString(answer)
        assert 0.0 <= resp.risk_score <= 1.0 and resp.transaction_id == r.transaction.transaction_id
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":"), (field, details)


@st.composite
def broken_bytes(draw: st.DrawFn) -> bytes:
    # Fixed ids and time: hypothesis replays a strategy, so what it builds on must not change between runs.
    good = scoring_pb2.ScoreRequest(request_id="r1", transaction=scoring_pb2.Transaction(
        transaction_id="tx-hostile-0001", customer_id="cust-hostile-0001", terminal_id="T1", amount=12.5))
    good.transaction.timestamp.FromSeconds(1_700_000_000)
    body = good.SerializeToString()
    kind = draw(st.sampled_from(["garbage", "truncated", "bad-utf8", "flipped"]))
    if kind == "garbage":
        return draw(st.binary(max_size=400))
    if kind == "truncated":
        return body[: draw(st.integers(0, len(body) - 1))]
    if kind == "bad-utf8":
        i = body.index(good.transaction.customer_id.encode())
        return body[:i] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) + body[i + 1:]
    i = draw(st.integers(0, len(body) - 1))
    return body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1:]


@HOSTILE
@given(data=broken_bytes(), method=st.sampled_from(["Score", "ScoreBatch"]))
def test_garbage_and_truncated_bytes_get_invalid_argument_or_an_answer(channel, data, method):
    code, details, _ = _call(channel, method, data)
    _assert_acceptable(code, details)
    assert code != grpc.StatusCode.RESOURCE_EXHAUSTED  # small messages: only a bad request or a good one
    message = scoring_pb2.ScoreRequest if method == "Score" else scoring_pb2.ScoreBatchRequest
    try:
        message.FromString(data)
    except Exception:  # undecodable: the service says so, in its own words
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"request is not a valid {message.DESCRIPTOR.full_name}")


def _good(i: int, run: str) -> scoring_pb2.ScoreRequest:
    r = scoring_pb2.ScoreRequest(request_id=f"{run}-{i}", transaction=scoring_pb2.Transaction(
        transaction_id=f"{run}-tx-{i}", customer_id=f"hostile-{run}-{i}", terminal_id=f"T{i % 7}", amount=float(i % 500)))
    r.transaction.timestamp.GetCurrentTime()
    return r


@pytest.mark.parametrize("n", [0, 1, 1000, 1001])
def test_score_batch_at_and_past_its_bound(channel, n):
    run = uuid.uuid4().hex[:8]
    body = scoring_pb2.ScoreBatchRequest(requests=[_good(i, run) for i in range(n)]).SerializeToString()
    code, details, answer = _call(channel, "ScoreBatch", body)
    _assert_acceptable(code, details)
    if n <= 1000:
        assert code == grpc.StatusCode.OK, details
        assert len(scoring_pb2.ScoreBatchResponse.FromString(answer).responses) == n
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("requests: holds 1001 requests")


def test_a_message_over_the_size_limit_is_resource_exhausted(channel):
    code, details, _ = _call(channel, "Score", b"\x0a" + b"\xff" * (17 * 1024 * 1024))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


def test_the_service_still_serves_after_the_hostile_run(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    code, details, answer = _call(channel, "Score", _good(0, uuid.uuid4().hex[:8]).SerializeToString())
    assert code == grpc.StatusCode.OK, details
    assert scoring_pb2.ScoreResponse.FromString(answer).source == scoring_pb2.MODEL
