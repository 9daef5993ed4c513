"""Admission control with a fake servicer context; through a real server in tests/e2e/test_overload.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from scoring_service.online.admission import PUSHBACK_KEY, REJECTED, AdmissionControl

SCORE = "/fraudscore.v1.FraudScoring/Score"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, remaining: float | None = 1.0) -> None:
        self.remaining = remaining
        self.trailing: tuple = ()
        self.code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, md: tuple) -> None:
        self.trailing = md

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        raise Aborted(message)


def test_past_the_bound_calls_are_refused_at_once_with_pushback_and_counted():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=3, min_time_s=0.002, pushback_ms=100)
        release = asyncio.Event()

        async def behaviour(request, context):
            await release.wait()
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        before = REJECTED.labels("overload")._value.get()
        running = [asyncio.create_task(handler.unary_unary(SimpleNamespace(), FakeContext())) for _ in range(3)]
        await asyncio.sleep(0)
        assert admission.in_flight == 3
        refused = FakeContext()
        with pytest.raises(Aborted, match="overloaded"):
            await handler.unary_unary(SimpleNamespace(), refused)
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.trailing == ((PUSHBACK_KEY, "100"),)
        assert REJECTED.labels("overload")._value.get() == before + 1
        release.set()
        assert await asyncio.gather(*running) == ["answer"] * 3
        assert admission.in_flight == 0  # released, so the next call is admitted
        assert await handler.unary_unary(SimpleNamespace(), FakeContext()) == "answer"

    asyncio.run(main())


def test_a_batch_counts_its_payments_and_a_lone_big_batch_is_still_admitted():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=10, min_time_s=0.0, pushback_ms=50)
        release = asyncio.Event()

        async def behaviour(request, context):
            await release.wait()
            return len(request.requests)

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        big = asyncio.create_task(handler.unary_unary(SimpleNamespace(requests=[1] * 25), FakeContext()))
        await asyncio.sleep(0)
        assert admission.in_flight == 25  # alone: admitted (the servicer bounds a batch's size)
        with pytest.raises(Aborted):
            await handler.unary_unary(SimpleNamespace(requests=[1]), FakeContext())
        release.set()
        assert await big == 25 and admission.in_flight == 0

    asyncio.run(main())


def test_a_call_without_time_left_is_refused_before_any_work_and_others_pass_through():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=10, min_time_s=0.005, pushback_ms=50)
        calls = []

        async def behaviour(request, context):
            calls.append(request)
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        late = FakeContext(remaining=0.001)
        with pytest.raises(Aborted, match="deadline"):
            await handler.unary_unary(SimpleNamespace(), late)
        assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED and calls == []
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(remaining=None)) == "answer"
        other = await admission.intercept_service(continuation, SimpleNamespace(method="/grpc.health.v1.Health/Check"))
        assert other.unary_unary is behaviour  # health and reflection are never refused

    asyncio.run(main())
