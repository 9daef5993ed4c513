"""The gRPC entrypoint: a thin servicer over :class:`~scoring_service.scorer.Scorer`.

Protobuf in, internal types through the scorer, protobuf out; errors are mapped to gRPC status
codes in one place (``_abort_for``): bad input is ``INVALID_ARGUMENT`` naming the field, bytes
that are not a request at all are ``INVALID_ARGUMENT`` too (``add_to_server`` registers the
service with request deserializers that never raise), a model error for one payment is
``INTERNAL: model error`` for that call only.

``ScoreBatch`` shares the budget of a ``Score`` among its items: they share one deadline, moved
earlier by what finishing all their answers after it takes, so that the items the model has not
scored by then get FALLBACK answers in time instead of the call running past the budget.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from scoring_service.core.validation import Payment, ValidationError, validate_payment
from scoring_service.logging import get_logger, hash_id
from scoring_service.online.batcher import ModelFailed
from scoring_service.online.options import RequestOptions
from scoring_service.online.scorer import Known, NoModelLoaded, Scorer, ScoreResult
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
SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name
# What finishing one more ScoreBatch item costs after the items' deadline (its FALLBACK answer, its
# two log lines, its encoding): ~30 us for the servicer's part alone, ~90 us in all measured on 2
# busy cores. A batch of n items moves its items' deadline that much earlier per item (at most half
# the budget): 1,000 items keep ~50 ms of a 100 ms budget for their cache reads and the model.
_BATCH_ITEM_ANSWER_S = 50e-6


@functools.cache
def _latency_of(source: str) -> Any:
    return LATENCY.labels(source)  # the child once: labels() costs a lock and a lookup per payment


class Undecodable:
    """What a request deserializer gives for bytes that are not a valid message (never raises)."""

    __slots__ = ("message_name", "size")

    def __init__(self, message_name: str, size: int) -> None:
        self.message_name = message_name
        self.size = size


class UndecodableRequest(ValueError):
    """The request's bytes do not decode (truncated, malformed, a string that is not UTF-8): INVALID_ARGUMENT."""

    def __init__(self, request: Undecodable) -> None:
        super().__init__(f"request is not a valid {request.message_name} ({request.size} bytes that do not decode: "
                         "truncated, malformed, or a string field that is not UTF-8)")


def tolerant_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """``message_type.FromString`` that returns :class:`Undecodable` instead of raising (a raising
    deserializer makes gRPC answer ``UNKNOWN`` with a Python class name, before the servicer runs)."""
    name = message_type.DESCRIPTOR.full_name
    parse = message_type.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError (truncated, malformed, bad UTF-8), nesting too deep, ...
            return Undecodable(name, len(data))

    return deserialize


def decoded(request: Any) -> Any:
    """The request, or UndecodableRequest when its bytes did not decode."""
    if isinstance(request, Undecodable):
        raise UndecodableRequest(request)
    return request


def payment_of(request: scoring_pb2.ScoreRequest, default_currency: str, prefix: str = "") -> Payment:
    """The request's transaction as a validated Payment; ValidationError names the bad field."""
    if not request.HasField("transaction"):
        raise ValidationError(prefix + "transaction", "is required")
    tx = request.transaction
    ts = tx.timestamp.seconds + tx.timestamp.nanos / 1e9 if tx.HasField("timestamp") else None
    if len(request.request_id) > 128:
        raise ValidationError(prefix + "request_id", "is longer than 128 characters")
    if not tx.HasField("amount"):  # 0 sent explicitly is a card verification; absent is a client bug
        raise ValidationError(prefix + "transaction.amount", "is required")
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

    def _deadline(self, context: grpc.aio.ServicerContext, start: float, items: int = 1) -> float:
        """When the scoring of the call's items must end: the budget (never beyond the caller's
        deadline), less the time it takes to finish ``items`` answers after it (a ScoreBatch)."""
        budget = self.options.budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        if items > 1:
            return start + budget - min(items * _BATCH_ITEM_ANSWER_S, budget / 2)
        return start + budget

    async def _score_one(
        self, request: scoring_pb2.ScoreRequest, payment: Payment, deadline: float, start: float,
        tally: dict[tuple[str, str, bool], int] | None = None, known: tuple[Known, bool] | None = None,
    ) -> scoring_pb2.ScoreResponse:
        """One payment's answer. In a ScoreBatch (``tally``), the answer is counted in the batch's tally
        (one metric update per kind at the end) and logged only when the model (or the cache) asked for
        REVIEW or DECLINE: the batch logs one ``score_batch`` line with the counts of every kind
        (1,000 log lines cost ~20 ms of the budget)."""
        request_id = request.request_id or uuid.uuid4().hex
        result = await self.scorer.score(payment, deadline, known)
        latency_ms = (time.monotonic() - start) * 1000.0
        _latency_of(result.source).observe(latency_ms / 1000.0)
        if tally is None:
            REQUESTS.labels(result.source, result.decision, "true" if result.degraded else "false").inc()
        else:
            kind = (result.source, result.decision, result.degraded)
            tally[kind] = tally.get(kind, 0) + 1
            if result.decision == "APPROVE" or result.degraded:  # in the batch's counts, not a line each
                return response_of(request_id, payment, result, latency_ms)
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
            request = decoded(request)
            payment = payment_of(request, self.options.default_currency)
            return await self._score_one(request, payment, self._deadline(context, start), start)
        except Exception as exc:
            await _abort_for(context, exc)

    async def ScoreBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        start = time.monotonic()
        try:
            request = decoded(request)
            n = len(request.requests)
            if n > self.options.max_batch_request:
                raise ValidationError("requests", f"holds {n} requests; at most {self.options.max_batch_request}")
            deadline = self._deadline(context, start, n)
            # Validate all first: one bad request fails the call before any work is done.
            payments = [payment_of(r, self.options.default_currency, f"requests[{i}].") for i, r in enumerate(request.requests)]
            tally: dict[tuple[str, str, bool], int] = {}
            knowns = await self.scorer.read_many(payments, deadline)  # one cache round trip for all the items
            answers = await asyncio.gather(
                *(self._score_one(r, p, deadline, start, tally, k)
                  for r, p, k in zip(request.requests, payments, knowns, strict=True)),
                return_exceptions=True,
            )
            for (source, decision, degraded), count in tally.items():
                REQUESTS.labels(source, decision, "true" if degraded else "false").inc(count)
            if self._sample:
                log.info("score_batch", items=n, answers={f"{s}/{d}{'/degraded' if g else ''}": c
                                                          for (s, d, g), c in tally.items()},
                         latency_ms=round((time.monotonic() - start) * 1000.0, 3))
            for i, answer in enumerate(answers):
                if isinstance(answer, ModelFailed):
                    raise ModelFailed(f"model error (requests[{i}])") from answer.__cause__
                if isinstance(answer, BaseException):
                    raise answer
            return scoring_pb2.ScoreBatchResponse(responses=answers)
        except Exception as exc:
            await _abort_for(context, exc)


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (a :class:`FraudScoringServicer`, or a wrapper with its ``Score`` and
    ``ScoreBatch``) on ``server`` as the generated ``add_FraudScoringServicer_to_server`` does, but
    with request deserializers that never raise: bytes that are not a valid request reach the
    servicer as :class:`Undecodable` and get ``INVALID_ARGUMENT`` (the generated deserializers
    raise inside gRPC, which answers ``UNKNOWN`` with a Python class name)."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=tolerant_deserializer(scoring_pb2.ScoreRequest),
            response_serializer=scoring_pb2.ScoreResponse.SerializeToString,
        ),
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(
            servicer.ScoreBatch,
            request_deserializer=tolerant_deserializer(scoring_pb2.ScoreBatchRequest),
            response_serializer=scoring_pb2.ScoreBatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """The one place where errors become gRPC statuses (messages name fields, never Python classes)."""
    if isinstance(exc, ValidationError | UndecodableRequest):
        INVALID.inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    if isinstance(exc, NoModelLoaded):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, ModelFailed):
        # The batcher logged the model's exception with its traceback; the other payments were answered.
        log.error("score.model_error", error=type(exc.__cause__).__name__, detail=str(exc))
        await context.abort(grpc.StatusCode.INTERNAL, str(exc))
    log.error("score.internal_error", error=type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
