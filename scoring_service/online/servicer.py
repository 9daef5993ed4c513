"""The gRPC entrypoint: a thin servicer over :class:`~scoring_service.scorer.Scorer`.

Protobuf in, internal types through the scorer, protobuf out; errors are mapped to gRPC status
codes in one place (``_abort_for``). Also serves grpc.health.v1 (SERVING once a model is loaded)
and server reflection, watches the registry for a newly activated model (loaded and verified
aside, then swapped in whole) and keeps the cache's active generation fresh.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from scoring_service.core.validation import Payment, ValidationError, validate_payment
from scoring_service.logging import get_logger, hash_id
from scoring_service.online.options import RequestOptions
from scoring_service.online.scorer import NoModelLoaded, Scorer, ScoreResult
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

log = get_logger(__name__)

REQUESTS = Counter("fraudscore_scores_total", "Scored payments.", ["source", "decision", "degraded"])
LATENCY = Histogram(
    "fraudscore_score_latency_seconds", "Server-side time per scored payment.", ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
INVALID = Counter("fraudscore_invalid_requests_total", "Requests refused with INVALID_ARGUMENT.")
_DECISIONS = {"APPROVE": scoring_pb2.APPROVE, "REVIEW": scoring_pb2.REVIEW, "DECLINE": scoring_pb2.DECLINE}
_SOURCES = {"CACHE": scoring_pb2.CACHE, "MODEL": scoring_pb2.MODEL, "FALLBACK": scoring_pb2.FALLBACK}


def payment_of(request: scoring_pb2.ScoreRequest, default_currency: str, prefix: str = "") -> Payment:
    """The request's transaction as a validated Payment; ValidationError names the bad field."""
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
        default_currency=default_currency,
        prefix=prefix + "transaction.",
    )


def response_of(request_id: str, payment: Payment, result: ScoreResult, latency_ms: float) -> scoring_pb2.ScoreResponse:
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
    def __init__(self, scorer: Scorer, options: RequestOptions) -> None:
        self.scorer = scorer
        self.options = options
        self._sample = options.log_sample_rate

    def _deadline(self, context: grpc.aio.ServicerContext, start: float) -> float:
        budget = self.options.budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return start + budget

    async def _score_one(
        self, request: scoring_pb2.ScoreRequest, payment: Payment, deadline: float, start: float
    ) -> scoring_pb2.ScoreResponse:
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
        return response_of(request_id, payment, result, latency_ms)

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        start = time.monotonic()
        try:
            payment = payment_of(request, self.options.default_currency)
            return await self._score_one(request, payment, self._deadline(context, start), start)
        except Exception as exc:
            await _abort_for(context, exc)

    async def ScoreBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        start = time.monotonic()
        try:
            n = len(request.requests)
            if n > self.options.max_batch_request:
                raise ValidationError("requests", f"holds {n} requests; at most {self.options.max_batch_request}")
            deadline = self._deadline(context, start)
            # Validate all first: one bad request fails the call before any work is done.
            payments = [payment_of(r, self.options.default_currency, f"requests[{i}].") for i, r in enumerate(request.requests)]
            answers = await asyncio.gather(
                *(self._score_one(r, p, deadline, start) for r, p in zip(request.requests, payments, strict=True))
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
    if isinstance(exc, NoModelLoaded):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    log.exception("score.internal_error", error=type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
