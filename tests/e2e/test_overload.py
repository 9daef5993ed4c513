"""Overload through the real service: shed with RESOURCE_EXHAUSTED and pushback, never fail open."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fraudscore_client import TIMEOUT_HEADER
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_scorer(model_data_dir: Path, redis_url: str) -> Iterator[ScorerProcess]:
    # A bound of 4 payments in flight and a 20 ms budget: 200 concurrent new cards are far past it. Each new
    # card waits up to 8 ms for the micro-batcher's window, so their handlers overlap on a quiet machine too
    # (with the 1 ms default, a fresh clone on an idle machine once answered all 200 one after another).
    env = {"FRAUDSCORE_MAX_IN_FLIGHT": "4", "FRAUDSCORE_BUDGET_MS": "20", "FRAUDSCORE_REDIS_TIMEOUT_MS": "80",
           "FRAUDSCORE_BATCH_MAX_WAIT_MS": "8"}
    proc = ScorerProcess(model_data_dir, redis_url, env=env).start()
    yield proc
    proc.stop()


def _request(amount: float) -> scoring_pb2.ScoreRequest:
    r = scoring_pb2.ScoreRequest(request_id=uuid.uuid4().hex, transaction=scoring_pb2.Transaction(
        transaction_id=uuid.uuid4().hex, customer_id=f"flood-{uuid.uuid4().hex[:10]}", terminal_id="T1", amount=amount))
    r.transaction.timestamp.GetCurrentTime()
    return r


async def _answered_after_pushback(stub, metadata: tuple, refused: Counter, tries: int = 30) -> scoring_pb2.ScoreResponse:
    """One call, retried as a well-behaved caller would while the service sheds (RESOURCE_EXHAUSTED,
    after its pushback): a call made while a loaded machine's loop runs late is refused too (a CI run's
    first, unqueued call met two late loop-lag samples over the 5 ms bound), and that refusal is not
    what these tests measure."""
    for _ in range(tries - 1):
        try:
            return await stub.Score(_request(10.0), timeout=3, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refused["RESOURCE_EXHAUSTED"] += 1
            await asyncio.sleep(int(dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms", "100")) / 1000)
    return await stub.Score(_request(10.0), timeout=3, metadata=metadata)


def test_past_the_bound_calls_are_shed_with_pushback_and_no_answer_fails_open(small_scorer):
    async def flood() -> tuple[Counter, list, list]:
        codes: Counter = Counter()
        pushbacks, answers = [], []
        async with grpc.aio.insecure_channel(small_scorer.address) as ch:
            stub = scoring_pb2_grpc.FraudScoringStub(ch)

            async def one(i: int) -> None:
                call = stub.Score(_request(50.0 + i % 100), timeout=2)
                try:
                    answers.append(await call)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    pushbacks.append(dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms"))

            await asyncio.gather(*(one(i) for i in range(200)))
        return codes, pushbacks, answers

    codes, pushbacks, answers = asyncio.run(flood())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # never UNKNOWN, INTERNAL or CANCELLED
    assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["OK"] > 0
    assert set(pushbacks) == {"20"}  # the budget, as the retry hint
    # an answer whose model was skipped is never an approval (fail closed, FRAUDSCORE_FALLBACK_MIN_DECISION)
    assert all(a.decision != scoring_pb2.APPROVE for a in answers if a.source == scoring_pb2.FALLBACK)
    with grpc.insecure_channel(small_scorer.address) as ch:  # and it keeps serving
        assert scoring_pb2_grpc.FraudScoringStub(ch).Score(_request(10.0), timeout=2).model_version


@pytest.fixture(scope="module", params=["sent timeout", "per connection"])
def queue_bound_scorer(request, model_data_dir: Path, redis_url: str) -> Iterator[tuple[ScorerProcess, tuple]]:
    """No in-flight bound to speak of: only the wait before the handler (5 ms) sheds load here. Measured
    by the timeout each call sends (the default, fraudscore_client's x-fraudscore-timeout-ms), or, for
    callers that send none, per connection (FRAUDSCORE_QUEUE_FROM_DEADLINE=true)."""
    env = {"FRAUDSCORE_MAX_IN_FLIGHT": "100000", "FRAUDSCORE_MAX_QUEUE_MS": "5"}
    metadata: tuple = ((TIMEOUT_HEADER, "3000"),)
    if request.param == "per connection":
        env["FRAUDSCORE_QUEUE_FROM_DEADLINE"], metadata = "true", ()
    proc = ScorerProcess(model_data_dir, redis_url, env=env).start()
    yield proc, metadata
    proc.stop()


def test_calls_that_queued_before_the_handler_are_refused_with_pushback_and_logged(queue_bound_scorer):
    scorer, metadata = queue_bound_scorer

    outside: Counter = Counter()  # refusals of the calls before and after the flood

    async def flood() -> tuple[Counter, list, list]:
        codes: Counter = Counter()
        details, answers = [], []
        async with grpc.aio.insecure_channel(scorer.address) as ch:
            stub = scoring_pb2_grpc.FraudScoringStub(ch)
            await _answered_after_pushback(stub, metadata, outside)  # the caller's deadline as seen unqueued

            async def one(i: int) -> None:
                try:
                    answers.append(await stub.Score(_request(50.0 + i % 100), timeout=3, metadata=metadata))
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    details.append((exc.details(), dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")))

            # 400 calls at once: at ~1 ms each, most wait far longer than 5 ms before their handler.
            await asyncio.gather(*(one(i) for i in range(400)))
            # the queue gone, a call is answered again
            assert (await _answered_after_pushback(stub, metadata, outside)).model_version
        return codes, details, answers

    codes, details, answers = asyncio.run(flood())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    # how many of the 400 got in before the 5 ms bound depends on the machine (on a quiet CI machine
    # grpc took them all in before the first handler ran: every one had queued, every one refused)
    assert codes["RESOURCE_EXHAUSTED"] > 0
    assert all("before being handled" in d and pushback == "100" for d, pushback in details)
    assert all(a.decision != scoring_pb2.APPROVE for a in answers if a.source == scoring_pb2.FALLBACK)
    refused = scorer.log_events("admission.refused")
    assert refused and {e["reason"] for e in refused} == {"queueing"}
    # at most a line a second, with a count
    assert sum(e["refused"] for e in refused) <= codes["RESOURCE_EXHAUSTED"] + outside["RESOURCE_EXHAUSTED"]


def test_by_default_one_connection_s_different_timeouts_are_not_taken_for_queueing(small_scorer):
    # The default measures a call's wait only by the timeout it sends: a caller that sends none, with
    # a 10 s timeout then a 0.5 s one on one connection (deadline propagation), is never refused for it.
    with grpc.insecure_channel(small_scorer.address) as ch:
        stub = scoring_pb2_grpc.FraudScoringStub(ch)
        for timeout in (10.0, 0.5, 10.0, 0.3):
            assert stub.Score(_request(10.0), timeout=timeout).model_version
