"""Admission control with a fake servicer context; through a real server in tests/e2e/test_overload.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest

from scoring_service.online.admission import (
    LOOP_LAG,
    PUSHBACK_KEY,
    QUEUE_WAIT,
    REJECTED,
    AdmissionControl,
    DeadlineWait,
    LoopLag,
)

SCORE = "/fraudscore.v1.FraudScoring/Score"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, remaining: float | None = 1.0, peer: str = "ipv4:10.0.0.1:50000") -> None:
        self.remaining = remaining
        self._peer = peer
        self.trailing: tuple = ()
        self.code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def peer(self) -> str:
        return self._peer

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


def test_while_the_loop_runs_late_new_calls_are_refused_before_any_work_but_not_for_one_pause():
    async def main():
        lag = LoopLag()
        admission = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.020,
                                     lag=lag)
        calls = []

        async def behaviour(request, context):
            calls.append(request)
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        lag.record(0.001)
        lag.record(0.300)  # one pause (a collection, a model swap): not overload
        assert await handler.unary_unary(SimpleNamespace(), FakeContext()) == "answer"
        before = REJECTED.labels("queueing")._value.get()
        lag.record(0.050)  # late twice in a row: calls wait ~50 ms before the handler
        refused = FakeContext()
        with pytest.raises(Aborted, match="wait 50 ms"):
            await handler.unary_unary(SimpleNamespace(), refused)
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.trailing == ((PUSHBACK_KEY, "40"),)
        assert REJECTED.labels("queueing")._value.get() == before + 1 and len(calls) == 1
        lag.record(0.002)  # caught up: admitted again
        assert await handler.unary_unary(SimpleNamespace(), FakeContext()) == "answer"

    asyncio.run(main())


def test_the_lag_monitor_measures_a_blocked_loop_and_exports_it():
    samples: list[float] = []

    async def main():

        class Recording(LoopLag):
            def record(self, lag_s: float) -> None:
                samples.append(lag_s)
                super().record(lag_s)

        lag = Recording(interval_s=0.002)
        count = sum(s.value for s in LOOP_LAG.collect()[0].samples if s.name.endswith("_count"))
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.01)
        time.sleep(0.08)  # the loop blocked: the timer due meanwhile runs ~80 ms late
        await asyncio.sleep(0.005)
        task.cancel()
        return count

    count = asyncio.run(main())
    assert max(samples) >= 0.05 and min(samples) < 0.05
    assert sum(s.value for s in LOOP_LAG.collect()[0].samples if s.name.endswith("_count")) > count


def test_a_call_that_waited_before_its_handler_is_refused_measured_by_its_callers_deadline():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.020,
                                     queue_from_deadline=True)
        calls = []

        async def behaviour(request, context):
            calls.append(request)
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        observed = sum(s.value for s in QUEUE_WAIT.collect()[0].samples if s.name.endswith("_count"))
        # A caller with 1 s deadlines: one call reached the handler at once (999 ms left), ...
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.999, "ipv4:10.0.0.1:1")) == "answer"
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.990, "ipv4:10.0.0.1:1")) == "answer"
        # ... this one waited ~100 ms before it (same connection): refused, no work done.
        late = FakeContext(0.900, "ipv4:10.0.0.1:1")
        with pytest.raises(Aborted, match="wait 99 ms"):
            await handler.unary_unary(SimpleNamespace(), late)
        assert late.code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 2
        # Another connection's shorter deadline is its own: not taken for a wait.
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.150, "ipv4:10.0.0.1:2")) == "answer"
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(None)) == "answer"  # no deadline: not measured
        assert sum(s.value for s in QUEUE_WAIT.collect()[0].samples if s.name.endswith("_count")) == observed + 4

    asyncio.run(main())


def test_deadline_wait_forgets_a_caller_s_longest_deadline_after_two_windows():
    w = DeadlineWait(window_s=10.0)
    assert w.wait("a", 1.0, now=0.0) == 0.0
    assert w.wait("a", 0.7, now=5.0) == pytest.approx(0.3)
    assert w.wait("a", 0.5, now=12.0) == pytest.approx(0.5)  # the last window's 1.0 still counts
    assert w.wait("a", 0.5, now=25.0) == pytest.approx(0.0)  # now the caller's deadline is 0.5


def test_without_queue_from_deadline_a_shorter_deadline_is_never_taken_for_a_wait():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.020)

        async def behaviour(request, context):
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        for remaining in (5.0, 0.5, 0.05):  # one channel, three callers' timeouts (a shared test channel)
            assert await handler.unary_unary(SimpleNamespace(), FakeContext(remaining)) == "answer"

    asyncio.run(main())
