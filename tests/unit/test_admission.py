"""Admission control with a fake servicer context; through a real server in tests/e2e/test_overload.py."""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace

import grpc
import pytest

from scoring_service.online.admission import (
    LOOP_LAG,
    PUSHBACK_KEY,
    QUEUE_WAIT,
    REJECTED,
    TIMEOUT_KEY,
    AdmissionControl,
    DeadlineWait,
    LoopLag,
)

SCORE = "/fraudscore.v1.FraudScoring/Score"


class FakeContext:
    def __init__(self, remaining: float | None = 1.0, peer: str = "ipv4:10.0.0.1:50000",
                 metadata: tuple = ()) -> None:
        self.remaining = remaining
        self.metadata = metadata
        self._peer = peer
        self.trailing: tuple = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return self.remaining

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def set_trailing_metadata(self, md: tuple) -> None:
        self.trailing = md

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


async def recording_handler(admission: AdmissionControl) -> tuple[grpc.RpcMethodHandler, list]:
    """The guarded method's handler from ``admission`` over a servicer that keeps each request it
    is given and answers "answer"."""
    calls: list = []

    async def behaviour(request, context):
        calls.append(request)
        return "answer"

    async def continuation(_details):
        return grpc.unary_unary_rpc_method_handler(behaviour)

    return await admission.intercept_service(continuation, SimpleNamespace(method=SCORE)), calls


async def refused_with(handler, request, context: FakeContext, match: str) -> None:
    """The call was answered with a status and no message, and its details say why."""
    assert await handler.unary_unary(request, context) is None
    assert context.code is not None and re.search(match, context.details), context.details


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
        await refused_with(handler, SimpleNamespace(), refused, "overloaded")
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
        await refused_with(handler, SimpleNamespace(requests=[1]), FakeContext(), "overloaded")
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
        await refused_with(handler, SimpleNamespace(), late, "deadline")
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

        handler, calls = await recording_handler(admission)
        lag.record(0.001)
        lag.record(0.300)  # one pause (a collection, a model swap): not overload
        assert await handler.unary_unary(SimpleNamespace(), FakeContext()) == "answer"
        before = REJECTED.labels("queueing")._value.get()
        lag.record(0.050)  # late twice in a row: calls wait ~50 ms before the handler
        refused = FakeContext()
        await refused_with(handler, SimpleNamespace(), refused, "wait 50 ms")
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

        handler, calls = await recording_handler(admission)
        observed = sum(s.value for s in QUEUE_WAIT.collect()[0].samples if s.name.endswith("_count"))
        # A caller with 1 s deadlines: one call reached the handler at once (999 ms left), ...
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.999, "ipv4:10.0.0.1:1")) == "answer"
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.990, "ipv4:10.0.0.1:1")) == "answer"
        # ... this one waited ~100 ms before it (same connection): refused, no work done.
        late = FakeContext(0.900, "ipv4:10.0.0.1:1")
        await refused_with(handler, SimpleNamespace(), late, "wait 99 ms")
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

        handler, _ = await recording_handler(admission)
        for remaining in (5.0, 0.5, 0.05):  # one channel, three callers' timeouts (a shared test channel)
            assert await handler.unary_unary(SimpleNamespace(), FakeContext(remaining)) == "answer"

    asyncio.run(main())


def test_while_shedding_a_new_call_is_refused_before_decoding_or_any_other_interceptor_and_counted():
    async def main():
        lag = LoopLag()
        refusals: list[tuple[str, str]] = []
        admission = AdmissionControl({SCORE}, max_in_flight=1, min_time_s=0.0, pushback_ms=40, max_queue_s=0.020,
                                     lag=lag, on_refused=[lambda method, code: refusals.append((method, code))])
        continued = []
        release = asyncio.Event()

        async def behaviour(request, context):
            await release.wait()
            return "answer"

        async def continuation(details):
            continued.append(details.method)
            return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=bytes.decode)

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        first = asyncio.create_task(handler.unary_unary(b"req", FakeContext()))
        await asyncio.sleep(0)
        assert admission.in_flight == 1 and continued == [SCORE]
        # the in-flight bound is reached: the next call's handler is the prebuilt refusal, no decoder
        shed = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert continued == [SCORE] and shed.request_deserializer is None
        refused = FakeContext()
        await refused_with(shed, b"\xff not a request", refused, "1 payments in flight")
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.trailing == ((PUSHBACK_KEY, "40"),)
        release.set()
        assert await first == "answer"
        lag.record(0.030)
        lag.record(0.030)  # the loop runs late: shed by the queueing bound
        before = REJECTED.labels("queueing")._value.get()
        shed = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        await refused_with(shed, b"", FakeContext(), "wait 30 ms")
        assert REJECTED.labels("queueing")._value.get() == before + 1
        assert refusals == [("Score", "RESOURCE_EXHAUSTED")] * 2 and continued == [SCORE]
        lag.record(0.001)
        lag.record(0.001)
        assert (await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))) is not shed

    asyncio.run(main())


def test_by_default_a_call_s_wait_is_its_sent_timeout_less_what_is_left_whatever_its_connection_sends():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.050)
        calls = []

        async def behaviour(request, context):
            calls.append(request)
            return "answer"

        async def continuation(_details):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        def sent(ms: str) -> tuple:
            return (("user-agent", "x"), (TIMEOUT_KEY, ms))

        handler = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        observed = sum(s.value for s in QUEUE_WAIT.collect()[0].samples if s.name.endswith("_count"))
        # one connection, three timeouts, none waited: all pass (the per-connection guess would refuse two)
        for remaining, ms in ((9.999, "10000"), (1.999, "2000"), (0.0995, "100")):
            assert await handler.unary_unary(SimpleNamespace(), FakeContext(remaining, metadata=sent(ms))) == "answer"
        late = FakeContext(0.930, metadata=sent("1000"))  # a 1 s call with 930 ms left waited 70 ms
        await refused_with(handler, SimpleNamespace(), late, "wait 70 ms")
        assert late.code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 3
        # a malformed or negative value: measured per connection (the first call on it did not wait);
        # none: not measured (the loop's lag still is)
        for md in (sent("soon"), sent("-5"), ()):
            assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.5, metadata=md)) == "answer"
        assert sum(s.value for s in QUEUE_WAIT.collect()[0].samples if s.name.endswith("_count")) == observed + 6
        off = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.050,
                               queue_from_deadline=False)
        handler = await off.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.930, metadata=sent("1000"))) == "answer"

    asyncio.run(main())


def echo_chain() -> tuple:
    """A chain behind admission control that echoes the decoded request, and records each time it is
    continued (the other interceptors) and each request it decodes."""
    continued: list = []
    decoded: list = []

    async def behaviour(request, context):
        return request

    def decode(raw: bytes) -> str:
        decoded.append(raw)
        return raw.decode()

    async def continuation(details):
        continued.append(details.method)
        return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=decode)

    return continuation, continued, decoded


def test_a_call_refused_for_time_is_never_decoded_nor_seen_by_the_other_interceptors():
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=10, min_time_s=0.005, pushback_ms=50)
        continuation, continued, decoded = echo_chain()

        first = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert await first.unary_unary(b"one", FakeContext()) == "one" and continued == [SCORE]
        gate = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert continued == [SCORE]  # the chain runs only once the call is admitted
        late = FakeContext(remaining=0.001)
        await refused_with(gate, b"two", late, "deadline")
        assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED and continued == [SCORE] and decoded == [b"one"]
        gate = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert await gate.unary_unary(b"three", FakeContext()) == "three"
        assert continued == [SCORE, SCORE] and decoded == [b"one", b"three"]

    asyncio.run(main())


def test_a_precheck_refuses_a_call_before_it_is_decoded_or_reaches_the_other_interceptors():
    """The failed-authentication budget (online/auth.py, AuthInterceptor.precheck) is checked here:
    a caller past it costs no decoding, no telemetry wrapper and no key check, and no exception."""
    from scoring_service.online.admission import Refusal

    async def main():
        blocked = {"ipv4:10.6.6.6:1"}
        observed: list = []

        def precheck(context):
            if context.peer() in blocked:
                return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many failed authentications",
                               (("grpc-retry-pushback-ms", "700"),))
            return None

        admission = AdmissionControl({SCORE}, max_in_flight=10, min_time_s=0.005, pushback_ms=50,
                                     on_refused=[lambda method, code: observed.append((method, code))],
                                     prechecks=[precheck])
        continuation, continued, decoded = echo_chain()

        first = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        assert await first.unary_unary(b"one", FakeContext()) == "one"
        gate = await admission.intercept_service(continuation, SimpleNamespace(method=SCORE))
        context = FakeContext(peer="ipv4:10.6.6.6:1")
        await refused_with(gate, b"two", context, "too many failed authentications")
        assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED and context.trailing == (("grpc-retry-pushback-ms", "700"),)
        assert continued == [SCORE] and decoded == [b"one"] and observed == [("Score", "RESOURCE_EXHAUSTED")]
        assert admission.in_flight == 0
        assert await gate.unary_unary(b"three", FakeContext()) == "three"  # another caller passes

    asyncio.run(main())


def test_a_sent_timeout_that_its_call_s_deadline_contradicts_is_not_believed_the_wait_is_measured_per_connection():
    """Issue 21 (8): ``x-fraudscore-timeout-ms`` is the caller's word. A caller with 1 s deadlines
    that sent ``1`` had every wait taken for 0, in any mode: it opted out of the queueing bound. A
    sent timeout shorter than what its own deadline leaves (past the wire's rounding), not finite,
    or over an hour is not believed; the call is measured per connection as one that sent none."""
    async def main():
        admission = AdmissionControl({SCORE}, max_in_flight=100, min_time_s=0.0, pushback_ms=40, max_queue_s=0.050)
        handler, calls = await recording_handler(admission)

        def sent(ms: str) -> tuple:
            return ((TIMEOUT_KEY, ms),)

        conn = "ipv4:10.0.0.9:40000"
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.999, conn, sent("1"))) == "answer"
        late = FakeContext(0.899, conn, sent("1"))  # waited 100 ms before its handler, as the truth (1000) says
        await refused_with(handler, SimpleNamespace(), late, "wait 100 ms")
        assert late.code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 1
        for ms in ("0", "800", "nan", "inf", "1e12", "-5", "soon"):
            lie = FakeContext(0.899, conn, sent(ms))
            await refused_with(handler, SimpleNamespace(), lie, "wait 100 ms")
        # the truth is believed; so is a deadline that grpc-core rounded up on the wire (1 % at most)
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(0.899, conn, sent("899.5"))) == "answer"
        other = "ipv4:10.0.0.9:40001"
        assert await handler.unary_unary(SimpleNamespace(), FakeContext(1.009, other, sent("1000"))) == "answer"
        late = FakeContext(0.930, other, sent("1000"))
        await refused_with(handler, SimpleNamespace(), late, "wait 70 ms")

    asyncio.run(main())
