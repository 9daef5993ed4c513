"""The gRPC entrypoint: a thin servicer over :class:`~scoring_service.scorer.Scorer`.

Protobuf in, internal types through the scorer, protobuf out; errors are mapped to gRPC status
codes in one place (``_abort_for``). Also serves grpc.health.v1 (SERVING once a model is loaded)
and server reflection, watches the registry for a newly activated model (loaded and verified
aside, then swapped in whole) and keeps the cache's active generation fresh.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
from scoring_service.config import Settings
from scoring_service.adapters.sql.db import make_engine
from scoring_service.logging import get_logger, hash_id
from scoring_service.adapters.model.gbdt import ModelError
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from scoring_service.adapters.sql.registry import Registry
from scoring_service.online.scorer import Scorer, ScoreResult, ServingModel
from scoring_service.core.validation import Payment, ValidationError, validate_payment

log = get_logger(__name__)

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name

REQUESTS = Counter("fraudscore_scores_total", "Scored payments.", ["source", "decision", "degraded"])
LATENCY = Histogram(
    "fraudscore_score_latency_seconds", "Server-side time per scored payment.", ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
INVALID = Counter("fraudscore_invalid_requests_total", "Requests refused with INVALID_ARGUMENT.")
_DECISIONS = {"APPROVE": scoring_pb2.APPROVE, "REVIEW": scoring_pb2.REVIEW, "DECLINE": scoring_pb2.DECLINE}
_SOURCES = {"CACHE": scoring_pb2.CACHE, "MODEL": scoring_pb2.MODEL, "FALLBACK": scoring_pb2.FALLBACK}


def _payment_of(request: scoring_pb2.ScoreRequest, settings: Settings, prefix: str = "") -> Payment:
    if not request.HasField("transaction"):
        raise ValidationError(prefix + "transaction", "is required")
    tx = request.transaction
    ts = tx.timestamp.seconds + tx.timestamp.nanos / 1e9 if tx.HasField("timestamp") else None
    if len(request.request_id) > 128:
        raise ValidationError(prefix + "request_id", "is longer than 128 characters")
    return validate_payment(
        transaction_id=tx.transaction_id,
        customer_id=tx.customer_id,
        terminal_id=tx.terminal_id,
        amount=tx.amount,
        currency=tx.currency,
        timestamp=ts,
        attributes=dict(tx.attributes) if tx.attributes else None,
        default_currency=settings.default_currency,
        prefix=prefix + "transaction.",
    )


def _response(request_id: str, payment: Payment, result: ScoreResult, latency_ms: float) -> scoring_pb2.ScoreResponse:
    resp = scoring_pb2.ScoreResponse(
        request_id=request_id,
        transaction_id=payment.transaction_id,
        risk_score=result.risk_score,
        decision=_DECISIONS[result.decision],
        source=_SOURCES[result.source],
        model_version=result.model_version,
        reasons=[scoring_pb2.Reason(code=c, feature=f, contribution=x) for c, f, x in result.reasons],
        degraded=result.degraded,
        latency_ms=latency_ms,
    )
    secs = int(result.scored_at)
    resp.scored_at.seconds = secs
    resp.scored_at.nanos = int((result.scored_at - secs) * 1e9)
    return resp


class FraudScoringServicer(scoring_pb2_grpc.FraudScoringServicer):
    def __init__(self, settings: Settings, scorer: Scorer) -> None:
        self.settings = settings
        self.scorer = scorer
        self._sample = settings.log_sample_rate if settings.log_requests else 0.0

    def _deadline(self, context: grpc.aio.ServicerContext, start: float) -> float:
        budget = self.settings.budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return start + budget

    async def _score_one(self, request: scoring_pb2.ScoreRequest, payment: Payment, deadline: float, start: float) -> scoring_pb2.ScoreResponse:
        request_id = request.request_id or uuid.uuid4().hex
        result = await self.scorer.score(payment, deadline)
        latency_ms = (time.monotonic() - start) * 1000.0
        REQUESTS.labels(result.source, result.decision, "true" if result.degraded else "false").inc()
        LATENCY.labels(result.source).observe(latency_ms / 1000.0)
        if self._sample and (self._sample >= 1.0 or random.random() < self._sample):
            log.info(
                "score",
                request_id=request_id,
                customer=hash_id(payment.customer_id),
                source=result.source,
                decision=result.decision,
                risk_score=round(result.risk_score, 6),
                model_version=result.model_version,
                degraded=result.degraded,
                latency_ms=round(latency_ms, 3),
            )
        return _response(request_id, payment, result, latency_ms)

    async def Score(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        start = time.monotonic()
        try:
            return await self._score_one(request, _payment_of(request, self.settings), self._deadline(context, start), start)
        except Exception as exc:
            await _abort_for(context, exc)

    async def ScoreBatch(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        start = time.monotonic()
        try:
            n = len(request.requests)
            if n > self.settings.max_batch_request:
                raise ValidationError("requests", f"holds {n} requests; at most {self.settings.max_batch_request}")
            deadline = self._deadline(context, start)
            # Validate all first: one bad request fails the call before any work is done.
            payments = [_payment_of(r, self.settings, f"requests[{i}].") for i, r in enumerate(request.requests)]
            answers = await asyncio.gather(
                *(self._score_one(r, p, deadline, start) for r, p in zip(request.requests, payments))
            )
            return scoring_pb2.ScoreBatchResponse(responses=answers)
        except Exception as exc:
            await _abort_for(context, exc)


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """The one place where errors become gRPC statuses."""
    if isinstance(exc, ValidationError):
        INVALID.inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    if isinstance(exc, RuntimeError) and str(exc) == "no model loaded":
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
    log.exception("score.internal_error", error=type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")


class ScoringServer:
    """One server process: gRPC server, scorer, registry watcher, generation refresher."""

    def __init__(self, settings: Settings, redis_url: str | None) -> None:
        self.settings = settings
        self.registry = Registry(make_engine(settings.resolved_database_url()))
        self.cache = (
            EntityCache(
                redis_url,
                timeout_s=settings.redis_timeout_ms / 1000.0,
                ttl_s=settings.cache_ttl_s,
                breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
            )
            if redis_url
            else None
        )
        self.scorer = Scorer(settings, self.cache)
        self.health = health.aio.HealthServicer()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def load_active_model(self) -> bool:
        """Load the registry's active version if it differs from the one serving. True if swapped."""
        record = await asyncio.to_thread(self.registry.active)
        current = self.scorer.serving
        if record is None or (current is not None and current.version == record.version):
            return False
        try:
            serving = await asyncio.to_thread(ServingModel.load, record, self.settings, self._executor)
        except ModelError as exc:
            log.error("model.refused", model_version=record.version, error=str(exc),
                      serving=current.version if current else None)
            return False
        serving.batcher.start()
        if self.cache is not None:
            await self.cache.refresh_generation(serving.version)
        self.scorer.serving = serving  # one reference swap: requests see the old or the new, whole
        log.info("model.serving", model_version=record.version, framework=record.framework, device=serving.model.device,
                 previous=current.version if current else None)
        if current is not None:
            await asyncio.sleep(0.5)
            await current.batcher.stop()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return True

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                await self.load_active_model()
            except Exception:
                log.exception("model.watch_failed")

    async def _watch_generation(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            serving = self.scorer.serving
            if serving is not None and self.cache is not None:
                await self.cache.refresh_generation(serving.version)

    async def start(self) -> int:
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        scoring_pb2_grpc.add_FraudScoringServicer_to_server(FraudScoringServicer(self.settings, self.scorer), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(self.settings.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.settings.listen}")
        await self.load_active_model()
        # Everything allocated so far (modules, the model) lives as long as the process: move it out
        # of the collector's sight, so that a full collection walks only what requests allocate.
        # Without it, a gen-2 collection walks ~10^6 objects (pandas, xgboost) in the middle of a request.
        gc.collect()
        gc.freeze()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._watch_registry(), name="registry-watch"),
            asyncio.create_task(self._watch_generation(), name="generation-watch"),
        ]
        log.info("server.started", listen=self.settings.listen, port=self.port, pid=os.getpid(),
                 mode=self.settings.mode.value, model_version=self.scorer.serving.version if self.scorer.serving else None)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.scorer.serving is not None:
            await self.scorer.serving.batcher.stop()
        if self.cache is not None:
            await self.cache.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("server.stopped", pid=os.getpid())


async def serve_forever(settings: Settings, redis_url: str | None) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0")
    server = ScoringServer(settings, redis_url)
    await server.start()
    await until_signalled()
    await server.stop()


async def until_signalled() -> None:
    """Return once the process gets SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
