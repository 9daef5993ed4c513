"""Admission control: shed load before any expensive work, with a clear status the caller can act on.

An interceptor in front of ``Score`` and ``ScoreBatch`` (one layer, not checks sprinkled through
the use case). Per process it bounds the payments in flight (a ScoreBatch counts its items):
past ``max_in_flight`` a call is refused at once with ``RESOURCE_EXHAUSTED`` and the trailing
metadata ``grpc-retry-pushback-ms`` (gRPC's retry hint), so the caller's own fallback decides
within its deadline instead of queueing behind work the service cannot finish in time. A call
whose deadline leaves less than ``min_time_s`` is refused with ``DEADLINE_EXCEEDED`` before it
reaches the cache or the model. Both are counted (``fraudscore_rejected_total{reason}``) and
logged (at most one line a second per reason).

The bound comes from the budget: at the measured capacity of one process (about 1,000 unseen to
3,000 cached payments a second on this machine, bench/README.md), ``max_in_flight`` payments are
about as many as it answers in one budget, so an admitted payment waits at most about one budget.

**Queueing before the handler.** The in-flight bound only sees calls that reached the handler.
Past capacity, calls wait before it, mostly in grpc-core: grpc.aio's server loop takes one new
call per turn or two of the event loop, so when the loop is busy the calls pile up unrequested
(measured on 2 cores at 1.2x capacity: admitted calls waited ~1 s while ``latency_ms`` said 9 ms,
and neither the in-flight count nor the loop's lag, under 20 ms, showed it). No arrival time
reaches Python, so the wait is measured from the call's deadline, and past ``max_queue_s`` a new
call is refused with ``RESOURCE_EXHAUSTED`` (reason ``queueing``) before any work, so the admitted
calls keep their budget. A refusal still costs CPU (docs/overload.md measures it): far past
capacity the excess has to be shed before this process too (``fraudscore_client``'s adaptive
throttling, a proxy).

* **The timeout the caller sent** (``x-fraudscore-timeout-ms``, ``TIMEOUT_KEY``; ``fraudscore_client``
  and the benchmark's generator send it; ``queue_from_deadline`` "auto", the default, or true):
  gRPC sets the server-side deadline when the call's headers arrive (arrival + the caller's
  timeout), so the call waited its timeout less its ``time_remaining()`` at the handler. Exact,
  per call, whatever the other calls on the connection send. Histogram
  ``fraudscore_queue_wait_seconds``. It is the caller's word, so it is believed only within the
  bounds the call's own deadline sets (``agrees``): at least what remains of the deadline
  (less grpc-core's rounding of it on the wire, 1 % + 2 ms), finite, at most an hour. A caller
  that sent ``1`` used to have every wait taken for 0 and escaped the bound; a value out of
  bounds (or malformed) is now measured like a call that sent none, per connection.
* ``DeadlineWait``, for callers that send no timeout, only with ``queue_from_deadline=true``, and
  for calls whose sent timeout is not believed, in both modes: per caller (method and connection:
  the peer's address and port), the largest ``time_remaining()`` seen at the handler over the
  last ``window_s`` is taken for its timeout (a call that did not wait); a call's wait is that
  minus its own ``time_remaining()``. A caller that sends different timeouts on one connection
  (deadline propagation, a shared test channel) looks queued when it sends a shorter one, and
  would be refused: so it is not the default for callers that send nothing.
* ``LoopLag``: a timer every ``interval_s``; how late it ran (histogram
  ``fraudscore_event_loop_lag_seconds``) is what any ready call waits per step on its way to the
  handler; the bound applies to two late samples in a row, so one pause is not taken for overload.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from fraudscore_client import TIMEOUT_HEADER
from scoring_service.logging import get_logger

log = get_logger(__name__)

REJECTED = Counter("fraudscore_rejected_total", "Calls refused before any work, by reason.", ["reason"])
IN_FLIGHT = Gauge("fraudscore_in_flight_payments", "Payments being scored now (this process).")
LOOP_LAG = Histogram(
    "fraudscore_event_loop_lag_seconds", "How late the event loop ran a timer due now: the wait of a ready call.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
QUEUE_WAIT = Histogram(
    "fraudscore_queue_wait_seconds", "Time from a call's arrival to its handler (calls with a deadline; DeadlineWait).",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PUSHBACK_KEY = "grpc-retry-pushback-ms"
TIMEOUT_KEY = TIMEOUT_HEADER  # the caller's timeout of this call, sent with it (one name, the client's)
# grpc-core sends a call's timeout rounded up to three significant figures (grpc-timeout "1010m" for
# 1,001 ms): up to 1 % more than the client's; 2 ms for the header's own rounding (0.1 ms) and the clocks.
TIMEOUT_ROUNDING, TIMEOUT_SLACK_S = 0.01, 0.002
MAX_SENT_TIMEOUT_S = 3600.0  # longer than any scoring call's timeout: a value past it is not a timeout


def sent_timeout(metadata: Any) -> float | None:
    """The timeout (s) the caller sent with the call (``TIMEOUT_KEY``): None when absent, NaN when
    not a number."""
    for key, value in metadata or ():
        if key == TIMEOUT_KEY:
            try:
                return float(value) / 1000.0
            except ValueError:
                return math.nan
    return None


def agrees(sent: float, remaining: float) -> bool:
    """Whether a sent timeout is one the call's own deadline allows: at least what is left of it
    (``remaining``, past the wire's rounding), at most ``MAX_SENT_TIMEOUT_S`` (NaN: neither)."""
    return remaining <= sent * (1.0 + TIMEOUT_ROUNDING) + TIMEOUT_SLACK_S and sent <= MAX_SENT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Refusal:
    """A precheck's answer (``AdmissionControl(prechecks=...)``): refuse the call with this status,
    message and trailing metadata, before it is decoded. The precheck counts and logs it."""

    code: grpc.StatusCode
    message: str
    trailing: tuple[tuple[str, str], ...] = ()


class DeadlineWait:
    """Arrival-to-handler time of calls with a deadline, per caller; see the module docstring."""

    def __init__(self, window_s: float = 10.0, max_callers: int = 4096) -> None:
        self.window_s = window_s
        self.max_callers = max_callers
        self._seen: dict[str, tuple[float, float, float]] = {}  # caller -> (max now, max last window, window start)

    def wait(self, caller: str, remaining: float, now: float) -> float:
        """How long this call waited before its handler (0 for the longest deadline seen lately)."""
        seen = self._seen.get(caller)
        if seen is None:
            if len(self._seen) >= self.max_callers:
                self._seen.clear()
            seen = (0.0, 0.0, now)
        top, previous, since = seen
        if now - since >= self.window_s:
            top, previous, since = 0.0, (top if now - since < 2 * self.window_s else 0.0), now
        top = max(top, remaining)
        self._seen[caller] = (top, previous, since)
        return max(top, previous) - remaining


class LoopLag:
    """How late the running event loop is: ``run()`` sleeps ``interval_s`` at a time and keeps how
    much later than due it woke up (``lag_s``, also observed in ``fraudscore_event_loop_lag_seconds``).
    ``sustained_s``: the smaller of the last two samples, so that one pause (a collection, a model
    swap) is not taken for overload; past capacity every sample is late."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self.sustained_s = 0.0

    def record(self, lag_s: float) -> None:
        self.sustained_s = min(self.lag_s, lag_s)
        self.lag_s = lag_s
        LOOP_LAG.observe(lag_s)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, loop.time() - due))


class AdmissionControl(grpc.aio.ServerInterceptor):
    """Bounds the payments in flight of the guarded methods; see the module docstring.

    The outermost interceptor, and a refusal costs as little as gRPC lets it: the time checks
    (deadline, queueing) look at the undecoded request, and only an admitted call goes through the
    other interceptors (keys, telemetry, tracing) and is decoded; a refusal is answered with
    ``set_code``, not an exception. While the process is shedding (the loop's lag past the bound,
    or the in-flight bound reached), a new call gets a prebuilt handler that refuses it at once.
    ``on_refused(method, code)`` callbacks count refusals where the other interceptors would have
    (``fraudscore_answers_total``, online/telemetry.py)."""

    def __init__(self, guarded: set[str], *, max_in_flight: int, min_time_s: float, pushback_ms: int,
                 max_queue_s: float = 0.0, queue_from_deadline: bool | str = "auto", lag: LoopLag | None = None,
                 on_refused: list[Callable[[str, str], None]] | None = None,
                 prechecks: list[Callable[[grpc.aio.ServicerContext], Refusal | None]] | None = None) -> None:
        self.guarded = guarded
        # checks of the caller made before decoding (the failed-authentication budget, online/auth.py)
        self.prechecks = prechecks or []
        self.max_queue_s = max_queue_s  # 0: no bound on the loop's lag
        self.lag = lag or LoopLag()
        # A call's wait before its handler, from its deadline: "auto" and True, by the timeout the
        # caller sent with it (TIMEOUT_KEY), or per connection (DeadlineWait) when its deadline
        # contradicts that timeout; True, also per connection for callers that send none; False:
        # neither (the loop's lag only).
        self.queue_from_deadline = queue_from_deadline
        self.deadline_wait = DeadlineWait()  # True: callers that send no timeout; both: those not believed
        self.max_in_flight = max_in_flight
        self.min_time_s = min_time_s
        self.pushback_ms = pushback_ms
        self.pushback = ((PUSHBACK_KEY, str(pushback_ms)),)
        self.on_refused = on_refused if on_refused is not None else []
        self.in_flight = 0
        self._last_log: dict[str, float] = {}  # reason -> when last logged
        self._refused_since_log: dict[str, int] = {}  # reason -> refusals not logged yet
        self._serializers: dict[str, Any] = {}  # method -> its response serializer (from the chain's handler)
        self._shed_handlers = {  # (method, reason) -> a handler that refuses at once
            (method, reason): grpc.unary_unary_rpc_method_handler(self._shedder(method.rsplit("/", 1)[-1], reason))
            for method in guarded for reason in ("queueing", "overload")
        }

    def _queueing(self, waited: float) -> str:
        return (f"overloaded: calls wait {waited * 1000:.0f} ms before being handled (at most "
                f"{self.max_queue_s * 1000:.0f}); retry after {self.pushback_ms} ms or apply your fallback")

    def _overload(self) -> str:
        return (f"overloaded: {self.in_flight} payments in flight (at most {self.max_in_flight}); "
                f"retry after {self.pushback_ms} ms or apply your fallback")

    def _shedding(self) -> str | None:
        """The reason to refuse any new call at once, judged before its request is decoded."""
        if self.max_queue_s and self.lag.sustained_s > self.max_queue_s:
            return "queueing"
        if self.in_flight >= self.max_in_flight:
            return "overload"
        return None

    def _shedder(self, method: str, reason: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[None]]:
        async def shed(_raw: bytes, context: grpc.aio.ServicerContext) -> None:
            message = self._queueing(self.lag.sustained_s) if reason == "queueing" else self._overload()
            self._refuse(context, method, reason, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return shed

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method not in self.guarded:
            return await continuation(handler_call_details)
        reason = self._shedding()
        if reason is not None:
            return self._shed_handlers[method, reason]
        first = None
        serializer = self._serializers.get(method)
        if method not in self._serializers:  # the method's first call: learn its response serializer from the chain
            first = await continuation(handler_call_details)
            if first is None or first.unary_unary is None:
                return first
            self._serializers[method] = serializer = first.response_serializer
        short = method.rsplit("/", 1)[-1]

        async def gate(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            """The time checks on the undecoded request; then the other interceptors, the decoding,
            the in-flight bound (a ScoreBatch counts its items) and the call."""
            remaining = context.time_remaining()
            if remaining is not None and remaining < self.min_time_s:
                return self._refuse(context, short, "deadline", grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the call's deadline leaves {remaining * 1000:.1f} ms: too little to score it")
            waited = self.lag.sustained_s
            if remaining is not None and self.queue_from_deadline:
                queued = self._queued(context, method, remaining)
                if queued is not None:
                    QUEUE_WAIT.observe(queued)
                    waited = max(waited, queued)
            if self.max_queue_s and waited > self.max_queue_s:
                return self._refuse(context, short, "queueing", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    self._queueing(waited))
            for precheck in self.prechecks:
                refusal = precheck(context)
                if refusal is not None:  # counted and logged by the precheck
                    return self._answer(context, short, refusal.code, refusal.message, refusal.trailing)
            handler = first or await continuation(handler_call_details)
            request = handler.request_deserializer(raw) if handler.request_deserializer is not None else raw
            items = len(getattr(request, "requests", ())) or 1
            if self.in_flight + items > self.max_in_flight and self.in_flight > 0:
                return self._refuse(context, short, "overload", grpc.StatusCode.RESOURCE_EXHAUSTED, self._overload())
            self.in_flight += items
            IN_FLIGHT.set(self.in_flight)
            try:
                return await handler.unary_unary(request, context)
            finally:
                self.in_flight -= items
                IN_FLIGHT.set(self.in_flight)

        return grpc.unary_unary_rpc_method_handler(gate, response_serializer=serializer)

    def _queued(self, context: grpc.aio.ServicerContext, method: str, remaining: float) -> float | None:
        """How long the call waited between its arrival and its handler: its timeout (as its caller
        sent it, when its deadline agrees) less what is left of it; else per connection, for a sent
        timeout that its deadline contradicts or, with ``queue_from_deadline=True``, none sent."""
        sent = sent_timeout(context.invocation_metadata())
        if sent is not None and agrees(sent, remaining):
            return max(0.0, sent - remaining)
        if sent is None and self.queue_from_deadline is not True:
            return None
        return self.deadline_wait.wait(f"{method} {context.peer()}", remaining, time.monotonic())

    def _refuse(self, context: grpc.aio.ServicerContext, method: str, reason: str, code: grpc.StatusCode,
                message: str) -> None:
        """Answer ``code`` without an exception (gRPC sends no message with a status other than OK)."""
        REJECTED.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log.get(reason, 0.0) >= 1.0:
            self._last_log[reason] = now
            refused, self._refused_since_log[reason] = self._refused_since_log.get(reason, 0) + 1, 0
            log.warning("admission.refused", reason=reason, refused=refused, in_flight=self.in_flight,
                        max_in_flight=self.max_in_flight, loop_lag_ms=round(self.lag.lag_s * 1000, 1), detail=message)
        else:
            self._refused_since_log[reason] = self._refused_since_log.get(reason, 0) + 1
        self._answer(context, method, code, message, self.pushback if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None)

    def _answer(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, message: str,
                trailing: tuple[tuple[str, str], ...] | None) -> None:
        """End a refused call with ``code`` and ``message`` (and ``trailing``), seen by the ``on_refused`` observers."""
        for observe in self.on_refused:
            observe(method, code.name)
        if trailing is not None:
            context.set_trailing_metadata(trailing)
        context.set_code(code)
        context.set_details(message)

