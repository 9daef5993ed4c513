"""The Score use case: cache-aside entity risk, GBDT inference for unseen entities, a hard budget.

The payment's entity is its customer (card). ``cache-first`` (default):

* the customer has a cache entry -> source CACHE: the entity scores of the customer and (when
  cached) the terminal, with the payment-level policy on top (``policy``); no model call;
* otherwise -> source MODEL: features of this payment from what is known (the payment, the
  terminal's cached state) by the shared feature module, the model through the micro-batcher,
  and the new customer entry written back to Redis without holding up the answer.

``always-model`` runs the model on every request, with the cached states of both entities and
the live payment: fresher and more precise on every payment, at the model's cost per request.

The budget (``budget_ms``, never beyond the caller's deadline) is enforced: a slow or failing
Redis is skipped (short timeout, circuit breaker) and the request goes on without the cache
(``degraded``); a model that cannot answer inside the remaining budget gives a FALLBACK answer:
the payment-level policy alone, flagged ``degraded``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from scoring_service.adapters.model.gbdt import GbdtModel
from scoring_service.adapters.redis.entity_cache import CUSTOMER, CacheEntry, CacheUnavailable, EntityCache
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core import features
from scoring_service.core.policy import Policy, Reason, combine_entities
from scoring_service.core.validation import Payment
from scoring_service.logging import get_logger
from scoring_service.online.batcher import MicroBatcher, Overloaded
from scoring_service.online.options import ModelOptions, ReasonMethod, ScoringMode

log = get_logger(__name__)

CACHE, MODEL, FALLBACK = "CACHE", "MODEL", "FALLBACK"
# Time kept back from the budget for encoding the answer and the network.
_ANSWER_MARGIN_S = 0.002


@dataclass(frozen=True, slots=True)
class NoModelLoaded(RuntimeError):
    """No model version is serving yet (start-up, or every version was refused): UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class ScoreResult:
    risk_score: float
    decision: str
    source: str
    model_version: str
    reasons: list[Reason]
    scored_at: float
    degraded: bool


@dataclass
class ServingModel:
    """One loaded model version with everything needed to serve it; swapped whole, never edited."""

    record: ModelRecord
    model: GbdtModel
    policy: Policy
    batcher: MicroBatcher
    top_k: int = 3
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.record.version

    @classmethod
    def of(cls, record: ModelRecord, model: GbdtModel, options: ModelOptions, executor: ThreadPoolExecutor) -> ServingModel:
        """Serve ``model`` (loaded by the composition root's model loader) with its policy and a micro-batcher."""
        top_k = 3
        exact_from = {
            ReasonMethod.EXACT: None,
            ReasonMethod.EXACT_WHEN_FLAGGED: float(record.thresholds["review"]),
            ReasonMethod.APPROX: float("inf"),
        }[options.reasons]

        def score_rows(x: np.ndarray) -> tuple[np.ndarray, list[list[Reason]]]:
            return model.predict_and_explain(x, top_k=top_k, exact_from=exact_from)

        batcher = MicroBatcher(
            score_rows,
            max_size=options.batch_max_size,
            max_wait_s=options.batch_max_wait_ms / 1000.0,
            executor=executor,
            # NumPy batches run on the event loop (no thread hop); so does the TreeSHAP call for the
            # rare flagged rows among them (~0.3 ms). TreeSHAP for every row, big batches and
            # LightGBM stay in the model thread.
            inline_max_rows=0 if exact_from is None else min(options.batch_inline_max_rows, model.forest_max_rows),
        )
        return cls(record=record, model=model, policy=Policy.of(record.thresholds, record.policy), batcher=batcher, top_k=top_k)


class Scorer:
    """The Score use case over one cache (None: none configured) in one mode; ``serving`` is swapped whole."""

    def __init__(self, cache: EntityCache | None, mode: ScoringMode = ScoringMode.CACHE_FIRST) -> None:
        self.cache = cache
        self.mode = mode
        self.serving: ServingModel | None = None

    async def score(self, payment: Payment, deadline: float) -> ScoreResult:
        """Score one payment; ``deadline`` is a ``time.monotonic()`` instant."""
        serving = self.serving
        if serving is None:
            raise NoModelLoaded("no model loaded yet")
        version = serving.version
        degraded = False
        customer = terminal = None
        if self.cache is not None:
            remaining = deadline - time.monotonic() - _ANSWER_MARGIN_S
            try:
                customer, terminal = await self.cache.get_pair(
                    version, payment.customer_id, payment.terminal_id, max(remaining, 0.0)
                )
            except CacheUnavailable:
                degraded = True
        else:
            degraded = True

        if customer is not None and self.mode is ScoringMode.CACHE_FIRST:
            return self._from_cache(serving, payment, customer, terminal, degraded)
        return await self._from_model(serving, payment, customer, terminal, deadline, degraded)

    def _from_cache(
        self, serving: ServingModel, payment: Payment, customer: CacheEntry, terminal: CacheEntry | None, degraded: bool
    ) -> ScoreResult:
        base, reasons = combine_entities(
            (customer.risk_score, customer.reasons), (terminal.risk_score, terminal.reasons) if terminal else None
        )
        risk, reasons = serving.policy.apply(base, reasons, payment.amount, customer.state, serving.top_k)
        scored_at = customer.computed_at if terminal is None else max(customer.computed_at, terminal.computed_at)
        return ScoreResult(risk, serving.policy.decide(risk), CACHE, serving.version, reasons, scored_at, degraded)

    async def _from_model(
        self,
        serving: ServingModel,
        payment: Payment,
        customer: CacheEntry | None,
        terminal: CacheEntry | None,
        deadline: float,
        degraded: bool,
    ) -> ScoreResult:
        customer_state = customer.state if customer else None
        terminal_state = terminal.state if terminal else None
        try:
            row = features.online_features(payment.amount, payment.timestamp, customer_state, terminal_state)
        except (KeyError, TypeError, ValueError) as exc:
            # An entry from another schema: score as unseen rather than fail the payment.
            log.warning("cache.malformed_entry", error=repr(exc), model_version=serving.version)
            customer_state = terminal_state = None
            row = features.online_features(payment.amount, payment.timestamp, None, None)
        remaining = deadline - time.monotonic() - _ANSWER_MARGIN_S
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                prob, reasons = await serving.batcher.submit(row)
        except (TimeoutError, Overloaded) as exc:
            log.warning("model.fallback", reason=type(exc).__name__, model_version=serving.version)
            return self._fallback(serving, payment, customer_state)
        risk, reasons = serving.policy.apply(prob, reasons, payment.amount, customer_state, serving.top_k)
        now = time.time()
        if customer is None and self.cache is not None:
            entry = CacheEntry(
                risk_score=prob,
                state=features.advance_customer_state(None, payment.amount, payment.timestamp),
                model_version=serving.version,
                computed_at=now,
                reasons=list(reasons),
                generation=self.cache.generation(serving.version),
            )
            self.cache.write_back(serving.version, [(CUSTOMER, payment.customer_id, entry)])
        return ScoreResult(risk, serving.policy.decide(risk), MODEL, serving.version, reasons, now, degraded)

    def _fallback(self, serving: ServingModel, payment: Payment, customer_state: dict[str, float] | None) -> ScoreResult:
        """The documented fallback: the payment-level policy alone, flagged degraded."""
        risk, reasons = serving.policy.apply(0.0, [], payment.amount, customer_state, serving.top_k)
        if not reasons:
            reasons = [("MODEL_UNAVAILABLE", "", 0.0)]
        return ScoreResult(risk, serving.policy.decide(risk), FALLBACK, serving.version, reasons, time.time(), True)
