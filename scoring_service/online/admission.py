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
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from scoring_service.logging import get_logger

log = get_logger(__name__)

REJECTED = Counter("fraudscore_rejected_total", "Calls refused before any work, by reason.", ["reason"])
IN_FLIGHT = Gauge("fraudscore_in_flight_payments", "Payments being scored now (this process).")
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class AdmissionControl(grpc.aio.ServerInterceptor):
    """Bounds the payments in flight of the guarded methods; see the module docstring."""

    def __init__(self, guarded: set[str], *, max_in_flight: int, min_time_s: float, pushback_ms: int) -> None:
        self.guarded = guarded
        self.max_in_flight = max_in_flight
        self.min_time_s = min_time_s
        self.pushback_ms = pushback_ms
        self.in_flight = 0
        self._last_log: dict[str, float] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method not in self.guarded:
            return handler
        inner = handler.unary_unary

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            items = len(getattr(request, "requests", ())) or 1
            remaining = context.time_remaining()
            if remaining is not None and remaining < self.min_time_s:
                await self._refuse(context, "deadline", grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"the call's deadline leaves {remaining * 1000:.1f} ms: too little to score it")
            if self.in_flight + items > self.max_in_flight and self.in_flight > 0:
                await self._refuse(context, "overload", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"overloaded: {self.in_flight} payments in flight (at most {self.max_in_flight}); "
                                   f"retry after {self.pushback_ms} ms or apply your fallback")
            self.in_flight += items
            IN_FLIGHT.set(self.in_flight)
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= items
                IN_FLIGHT.set(self.in_flight)

        return grpc.unary_unary_rpc_method_handler(
            admitted, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode, message: str) -> None:
        REJECTED.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log.get(reason, 0.0) >= 1.0:
            self._last_log[reason] = now
            log.warning("admission.refused", reason=reason, in_flight=self.in_flight, max_in_flight=self.max_in_flight)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata(((PUSHBACK_KEY, str(self.pushback_ms)),))
        await context.abort(code, message)
