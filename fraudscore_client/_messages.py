"""The client's own types: a payment to score and the answer, converted from and to the protobuf messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scoring_service.protos import scoring_pb2


@dataclass(frozen=True)
class Transaction:
    """One card payment. ``transaction_id`` None: generated (once, so retries of a call send the same id).

    ``timestamp`` None: the service uses the time it receives the call. ``currency`` empty: the
    service's default. Amounts: 0 (a card verification) to 10,000,000 in the currency's units.
    """

    customer_id: str
    terminal_id: str
    amount: float
    transaction_id: str | None = None
    currency: str = ""
    timestamp: datetime | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reason:
    code: str
    feature: str
    contribution: float


@dataclass(frozen=True)
class ScoreResult:
    """The service's answer. ``decision``: APPROVE / REVIEW / DECLINE; ``source``: CACHE / MODEL / FALLBACK.

    ``raw`` is the ``fraudscore.v1.ScoreResponse`` message itself, for callers that want every field.
    """

    request_id: str
    transaction_id: str
    risk_score: float
    decision: str
    source: str
    model_version: str
    reasons: tuple[Reason, ...]
    scored_at: datetime | None
    degraded: bool
    latency_ms: float
    raw: Any = field(repr=False, compare=False)


def new_id() -> str:
    return uuid.uuid4().hex


def to_request(tx: Transaction, request_id: str | None = None) -> Any:
    """A ``ScoreRequest`` for ``tx``, with its ids filled in (the same ones on every attempt)."""
    message = scoring_pb2.Transaction(
        transaction_id=tx.transaction_id or new_id(), customer_id=tx.customer_id, terminal_id=tx.terminal_id,
        amount=tx.amount,  # setting it marks it present, 0 included
        currency=tx.currency, attributes=dict(tx.attributes),
    )
    if tx.timestamp is not None:
        when = tx.timestamp if tx.timestamp.tzinfo is not None else tx.timestamp.replace(tzinfo=UTC)
        message.timestamp.FromDatetime(when.astimezone(UTC))
    return scoring_pb2.ScoreRequest(request_id=request_id or new_id(), transaction=message)


def from_response(resp: Any) -> ScoreResult:
    scored_at = resp.scored_at.ToDatetime(tzinfo=UTC) if resp.HasField("scored_at") else None
    return ScoreResult(
        request_id=resp.request_id,
        transaction_id=resp.transaction_id,
        risk_score=resp.risk_score,
        decision=scoring_pb2.Decision.Name(resp.decision),
        source=scoring_pb2.Source.Name(resp.source),
        model_version=resp.model_version,
        reasons=tuple(Reason(r.code, r.feature, r.contribution) for r in resp.reasons),
        scored_at=scored_at,
        degraded=resp.degraded,
        latency_ms=resp.latency_ms,
        raw=resp,
    )
