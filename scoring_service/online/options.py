"""The online service's knobs as plain values: what the composition root hands the use case.

Light on purpose (no NumPy, no gRPC): ``scoring_service.config`` builds its settings on these
enums, and ``scoring_service.bootstrap`` turns the settings into these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class ScoringMode(StrEnum):
    """``cache-first``: a cached customer is answered from the cache; ``always-model``: the model every time."""

    CACHE_FIRST = "cache-first"
    ALWAYS_MODEL = "always-model"


class ReasonMethod(StrEnum):
    """How model answers get their reason codes (see ``GbdtModel.predict_and_explain``)."""

    EXACT = "exact"
    EXACT_WHEN_FLAGGED = "exact-when-flagged"
    APPROX = "approx"


class Clock(StrEnum):
    """Whose time velocity and the intraday order use (docs/security.md, "Time the service trusts").

    ``service``: the time this process received the payment; the caller's timestamp is used for the
    payment's own features only within ``max_clock_skew_s`` of it. ``event``: the caller's
    timestamp, trusted: replays and backtests of history through ``Score()``, never live traffic.
    """

    SERVICE = "service"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class TimeTrust:
    clock: Clock = Clock.SERVICE
    max_clock_skew_s: float = 300.0


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How a loaded model version is fed: reason method and micro-batching (loading: ``bootstrap.model_loader``)."""

    reasons: ReasonMethod = ReasonMethod.EXACT_WHEN_FLAGGED
    batch_max_size: int = 64
    batch_max_wait_ms: float = 1.0
    batch_inline_max_rows: int = 128


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What the gRPC servicer applies to each call."""

    budget_ms: float = 100.0
    default_currency: str = "EUR"
    max_batch_request: int = 1000
    log_sample_rate: float = 1.0  # share of answers logged; 0 = none


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """One server process: where it listens, how often it looks for a newly activated model, how it stops.

    Stopping (SIGTERM): health turns NOT_SERVING at once and the server keeps serving for
    ``drain_s`` (load balancers stop routing to it); then it accepts no new call and gives the
    calls in flight up to ``stop_grace_s`` to finish (more than the request budget), then waits
    for the background write-backs.
    """

    listen: str = "127.0.0.1:50051"
    registry_poll_s: float = 2.0
    generation_poll_s: float = 1.0
    metrics_port: int | None = None
    drain_s: float = 5.0
    stop_grace_s: float = 2.1
    max_in_flight: int = 128  # payments in flight past which calls get RESOURCE_EXHAUSTED (online/admission.py)
    min_call_time_ms: float = 2.0  # a call whose deadline leaves less gets DEADLINE_EXCEEDED before any work
    pushback_ms: int = 100  # grpc-retry-pushback-ms sent with RESOURCE_EXHAUSTED
    max_queue_ms: float = 50.0  # wait before the handler past which calls get RESOURCE_EXHAUSTED (admission.py)
    queue_from_deadline: bool | Literal["auto"] = "auto"  # measure that wait by the callers' deadlines too (admission.py)
    max_pending_calls: int = 0  # calls waiting in grpc-core past which it refuses new ones itself (0: gRPC's default)
