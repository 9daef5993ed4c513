"""The service's Prometheus metrics beyond the servicer's own, and the interceptors that count answers.

One metrics endpoint per process (``FRAUDSCORE_METRICS_PORT``; worker ``i`` of ``--workers N``
serves ``port + i``): Prometheus scrapes every worker and sums (``sum by (...)`` in the dashboard).
Every name and its meaning is in ``docs/observability.md``.

``TelemetryInterceptor`` is the outermost interceptor: it sees every answer, rejections by
admission control included (``fraudscore_answers_total{method,code}``), and the latency of each
answered payment by source and decision. ``AdmittedMarker`` sits just inside admission control:
the span between them is the ``admission`` span of a trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scoring_service.core.drift import DEFAULT_THRESHOLD, LiveDrift
from scoring_service.online import tracing

if TYPE_CHECKING:
    from scoring_service.online.server import ScoringServer

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

ANSWERS = Counter("fraudscore_answers_total", "Score/ScoreBatch calls answered, by method and gRPC status code "
                  "(rejections by admission control included).", ["method", "code"])
ANSWER_LATENCY = Histogram("fraudscore_answer_latency_seconds", "Time from the call's arrival to its answer, per "
                           "answered payment, by method, source and decision.", ["method", "source", "decision"],
                           buckets=_LATENCY_BUCKETS)
ANSWERS_BY_VERSION = Counter("fraudscore_answers_by_version_total", "Answered payments by the model version that "
                             "made them (canary share included).", ["version", "source"])
CACHE_LOOKUPS = Counter("fraudscore_cache_lookups_total", "Card lookups in the cache: hit (an entry), miss (none) or "
                        "error (Redis skipped: timeout, error, breaker open).", ["result"])
REDIS_ERRORS = Counter("fraudscore_redis_errors_total", "Cache reads that failed or were skipped, by reason.", ["reason"])
BREAKER_STATE = Gauge("fraudscore_redis_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open.")
BATCH_SIZE = Histogram("fraudscore_batch_size", "Rows per model call of the micro-batcher.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_WAIT = Histogram("fraudscore_batch_wait_seconds", "A row's wait in the micro-batcher's queue before its batch "
                       "is scored.", buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05))
INFERENCE = Histogram("fraudscore_inference_seconds", "Model call time per batch, by device.", ["device"],
                      buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1))
VERSION_INFO = Gauge("fraudscore_model_version_info", "The versions in use by role (active, shadow, canary): value 1.",
                     ["role", "version"])
_BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


@dataclass(frozen=True, slots=True)
class ObservabilityOptions:
    """Drift, shadow, canary and tracing settings of one server process (``bootstrap.observability_options``)."""

    drift_threshold: float = DEFAULT_THRESHOLD
    shadow_share: float = 0.0
    shadow_queue: int = 1000
    canary_share: float = 0.0
    otel: str = "off"
    otel_endpoint: str | None = None


class DriftCollector(Collector):
    """``fraudscore_feature_psi{feature}``, ``fraudscore_score_psi`` and the flags, computed at scrape time
    from the active version's live bin counts (``core.drift.LiveDrift``)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.drift: LiveDrift | None = None
        self.version = ""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        drift = self.drift
        feature = GaugeMetricFamily("fraudscore_feature_psi", "PSI of each model feature: rows the active version "
                                    "scored since it was loaded, against its training distribution.",
                                    labels=["feature", "version"])
        flagged = GaugeMetricFamily("fraudscore_feature_drift_flagged", "1 when the feature's PSI is past the "
                                    "threshold (FRAUDSCORE_DRIFT_THRESHOLD).", labels=["feature", "version"])
        score = GaugeMetricFamily("fraudscore_score_psi", "PSI of the model's score against its training "
                                  "(out-of-fold) distribution.", labels=["version"])
        rows = GaugeMetricFamily("fraudscore_drift_rows", "Rows in the live drift counts.", labels=["version"])
        if drift is not None:
            for name, value in drift.feature_psi().items():
                feature.add_metric([name, self.version], value)
                flagged.add_metric([name, self.version], 1.0 if value > self.threshold else 0.0)
            score.add_metric([self.version], drift.score_psi())
            rows.add_metric([self.version], drift.rows)
        yield from (feature, flagged, score, rows)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


DRIFT = DriftCollector(DEFAULT_THRESHOLD)
REGISTRY.register(DRIFT)


def observe_versions(roles: dict[str, str | None]) -> None:
    VERSION_INFO.clear()
    for role, version in roles.items():
        if version:
            VERSION_INFO.labels(role, version).set(1)


def _method(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Outermost: answers by code, latency per answered payment, the root span of a trace."""

    def __init__(self, guarded: set[str]) -> None:
        self.guarded = guarded

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method not in self.guarded:
            return handler
        inner = handler.unary_unary
        method = _method(handler_call_details.method)

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            with tracing.span(f"fraudscore.{method}") as root:
                tracing.start_admission()
                try:
                    answer = await inner(request, context)
                except BaseException as exc:
                    tracing.end_admission(False)
                    cancelled = isinstance(exc, asyncio.CancelledError)  # the caller went away
                    code = _code_of(context, default=grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN)
                    ANSWERS.labels(method, code).inc()
                    if root is not None:
                        root.set_attribute("rpc.grpc.status_code", code)
                    raise
                tracing.end_admission(False)  # a no-op when the inner marker closed it
                ANSWERS.labels(method, _code_of(context, default=grpc.StatusCode.OK)).inc()
                elapsed = time.monotonic() - start
                # a ScoreBatch's items (none for an empty batch), else the one answer (None after an abort)
                items = answer.responses if hasattr(answer, "responses") else (answer,) if answer is not None else ()
                for item in items:
                    source = _ENUM_NAMES["source"].get(item.source, "UNKNOWN")
                    decision = _ENUM_NAMES["decision"].get(item.decision, "UNKNOWN")
                    ANSWER_LATENCY.labels(method, source, decision).observe(elapsed)
                    ANSWERS_BY_VERSION.labels(item.model_version, source).inc()
                if root is not None and hasattr(answer, "model_version"):
                    root.set_attribute("fraudscore.model_version", answer.model_version)
                return answer

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class AdmittedMarker(grpc.aio.ServerInterceptor):
    """Just inside admission control: closes the ``admission`` span of an admitted call."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not tracing.enabled() or handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            tracing.end_admission(True)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            admitted, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _enum_names() -> dict[str, dict[int, str]]:
    from scoring_service.protos import scoring_pb2

    return {"source": {v.number: v.name for v in scoring_pb2.Source.DESCRIPTOR.values},
            "decision": {v.number: v.name for v in scoring_pb2.Decision.DESCRIPTOR.values}}


_ENUM_NAMES = _enum_names()


def _code_of(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default.name)
    return default.name


def instrument(server: ScoringServer, options: ObservabilityOptions) -> None:
    """Wire the metrics, drift, shadow/canary versions and tracing into one server process."""
    from scoring_service.online.servicer import SERVICE_NAME
    from scoring_service.online.shadow import Rollout

    tracing.configure(options.otel, options.otel_endpoint)
    DRIFT.threshold = options.drift_threshold
    guarded = {f"/{SERVICE_NAME}/Score", f"/{SERVICE_NAME}/ScoreBatch"}
    server.outer_interceptors.append(TelemetryInterceptor(guarded))
    server.refusal_observers.append(lambda method, code: ANSWERS.labels(method, code).inc())
    server.inner_interceptors.append(AdmittedMarker())
    cache = server.cache
    if cache is not None:
        breaker = cache.breaker
        BREAKER_STATE.set_function(lambda: _BREAKER_VALUES.get(breaker.state, 2.0))
    rollout = Rollout(server, options)
    server.watchers.append(rollout.watch)
