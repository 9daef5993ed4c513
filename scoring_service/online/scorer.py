"""The Score use case: cache-aside entity risk, intraday state, GBDT inference for new cards, a hard budget.

One round trip reads the card's and the terminal's cache entries and the card's intraday payments
(every payment the service scored, ``core.features.intraday``); the card's state is its cached
state with those payments merged, and its velocity comes from them. ``cache-first`` (default):

* the card has an entry from a batch run -> source CACHE: the entity risks of the card and (when
  cached) the terminal, with the payment-level policy on top (``core.policy``: amount rules against
  the merged state, velocity rules); no model call;
* otherwise (a card no batch run knows yet) -> source MODEL: features of this payment from the
  merged state and the terminal's cached state, the model through the micro-batcher. A card seen
  for the first time gets an entry written back after the answer: its entity risk
  (``core.entity_scoring``, the definition the nightly uses), never this payment's score.

Every scored payment is then added to its card's intraday list (in the background), so the next
payment a second later is judged with it.

``always-model`` runs the model on every request, with the cached states of both entities and
the live payment: fresher and more precise on every payment, at the model's cost per request.

The budget (``budget_ms``, never beyond the caller's deadline) is enforced: a slow or failing
Redis is skipped (short timeout, circuit breaker) and the request goes on without the cache
(``degraded``); a model that cannot answer inside the remaining budget gives a FALLBACK answer:
the cached entity risk (0 when none) with the payment-level policy on top, flagged ``degraded``.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from scoring_service.adapters.model.gbdt import GbdtModel
from scoring_service.adapters.redis.entity_cache import CUSTOMER, CacheEntry, CacheRead, CacheUnavailable, EntityCache
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core import entity_scoring, features
from scoring_service.core.cache_layout import BATCH, ONLINE
from scoring_service.core.features.intraday import merged_customer_state, previous_times
from scoring_service.core.features.velocity import Velocity, velocity_of
from scoring_service.core.policy import APPROVE, DECLINE, REVIEW, Policy, Reason, combine_entities
from scoring_service.core.validation import Payment
from scoring_service.logging import get_logger
from scoring_service.online import telemetry, tracing
from scoring_service.online.batcher import MicroBatcher, ModelFailed, Overloaded
from scoring_service.online.options import ModelOptions, ReasonMethod, ScoringMode

log = get_logger(__name__)

CACHE, MODEL, FALLBACK = "CACHE", "MODEL", "FALLBACK"
# Time kept back from the budget for encoding the answer and the network.
_ANSWER_MARGIN_S = 0.002
# How long a new card's write-back may wait for the model (in the background, after the answer).
_WRITE_BACK_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Known:
    """What the cache knows for one payment: the entries (None: not cached), the card's state with
    its intraday payments merged (None: nothing known) and the card's velocity (None: unknown)."""

    customer: CacheEntry | None
    terminal: CacheEntry | None
    state: dict[str, float] | None
    velocity: Velocity | None
    trim_intraday: bool = True  # the card's intraday list needs trimming (unknown: trim)

    @property
    def from_batch(self) -> bool:
        """The card's risk comes from a batch run over its history (else: a new card, or none)."""
        return self.customer is not None and self.customer.origin == BATCH

    def entity_risk(self) -> tuple[float, list[Reason]]:
        """The payment's base score from its entities' cached risks (0 and no reasons when none)."""
        c, t = self.customer, self.terminal
        return combine_entities((c.risk_score, c.reasons) if c else None, (t.risk_score, t.reasons) if t else None)


def in_canary(customer_id: str, share: float) -> bool:
    """Whether the card is in the canary's ``share`` of the cards: a stable hash (CRC-32) of its id,
    the same in every process and across restarts, so a card stays with one version."""
    return share > 0 and zlib.crc32(customer_id.encode()) % 10_000 < share * 10_000


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
        batcher.device = str(model.device)
        return cls(record=record, model=model, policy=Policy.of(record.thresholds, record.policy), batcher=batcher, top_k=top_k)


class Scorer:
    """The Score use case over one cache (None: none configured) in one mode; ``serving`` is swapped whole."""

    def __init__(
        self, cache: EntityCache | None, mode: ScoringMode = ScoringMode.CACHE_FIRST, intraday: bool = True,
        fallback_min_decision: str = REVIEW,
    ) -> None:
        self.cache = cache
        self.mode = mode
        self.fallback_min_decision = fallback_min_decision  # fail closed: a FALLBACK answer is at least this
        self.intraday = intraday  # False: no intraday reads or records (cached state only, velocity unknown)
        self.serving: ServingModel | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._fallbacks = 0  # FALLBACK answers since the last model.fallback line
        self._fallback_logged = -math.inf
        # online/shadow.py: the canary version and its share of the cards (in_canary); after each answer,
        # the observers (shadow scoring); each model row with its probability (live drift).
        self.canary: ServingModel | None = None
        self.canary_share = 0.0
        self.observers: list[Callable[[Payment, Known, ScoreResult], None]] = []
        self.on_model_row: Callable[[str, np.ndarray, float], None] | None = None

    async def score(self, payment: Payment, deadline: float, known: tuple[Known, bool] | None = None) -> ScoreResult:
        """Score one payment; ``deadline`` is a ``time.monotonic()`` instant; ``known``: what
        ``read_many`` read for it (a ScoreBatch), else the cache is read here."""
        serving = self.serving
        if serving is None:
            raise NoModelLoaded("no model loaded yet")
        canary = self.canary if self.canary is not None and in_canary(payment.customer_id, self.canary_share) else None
        known_, degraded = known if known is not None else await self._read(serving.version, payment, deadline)
        if self.cache is not None and self.intraday:
            self.cache.record_payment(payment.customer_id, payment.timestamp, payment.amount, payment.transaction_id,
                                      trim=known_.trim_intraday)
        if canary is None and known_.from_batch and self.mode is ScoringMode.CACHE_FIRST:
            result = self._from_cache(serving, payment, known_, degraded)
        else:  # a canary card is always scored by the canary model (the cache holds the active version's risks)
            result = await self._from_model(canary or serving, payment, known_, deadline, degraded)
        for observe in self.observers:
            observe(payment, known_, result)
        return result

    async def read_many(self, payments: Sequence[Payment], deadline: float) -> list[tuple[Known, bool]]:
        """What the cache knows of each payment (as ``score`` reads it), in one round trip for all."""
        serving = self.serving
        if serving is None:
            raise NoModelLoaded("no model loaded yet")
        if self.cache is None:
            return [(Known(None, None, None, None), True)] * len(payments)
        try:
            with tracing.span("cache.read"):
                reads = await self.cache.read_many(
                    serving.version, [(p.customer_id, p.terminal_id) for p in payments],
                    max(deadline - time.monotonic() - _ANSWER_MARGIN_S, 0.0), intraday=self.intraday)
        except CacheUnavailable as exc:
            self._count_unavailable(exc, len(payments))
            return [(Known(None, None, None, None), True)] * len(payments)
        return [self._known(serving.version, p, read) for p, read in zip(payments, reads, strict=True)]

    async def _read(self, version: str, payment: Payment, deadline: float) -> tuple[Known, bool]:
        """What the cache knows of the payment's card and terminal (one round trip), merged with
        the card's intraday payments; degraded when the cache could not be read in time."""
        if self.cache is None:
            return Known(None, None, None, None), True
        remaining = deadline - time.monotonic() - _ANSWER_MARGIN_S
        try:
            with tracing.span("cache.read"):
                read = await self.cache.read(version, payment.customer_id, payment.terminal_id, max(remaining, 0.0),
                                             intraday=self.intraday)
        except CacheUnavailable as exc:
            self._count_unavailable(exc, 1)
            return Known(None, None, None, None), True
        return self._known(version, payment, read)

    @staticmethod
    def _count_unavailable(exc: CacheUnavailable, lookups: int) -> None:
        telemetry.CACHE_LOOKUPS.labels("error").inc(lookups)
        telemetry.REDIS_ERRORS.labels("breaker_open" if "breaker" in str(exc) else "error").inc()

    def _known(self, version: str, payment: Payment, read: CacheRead) -> tuple[Known, bool]:
        customer = read.customer
        telemetry.CACHE_LOOKUPS.labels("miss" if customer is None else "hit").inc()
        from_batch = customer is not None and customer.origin == BATCH
        try:
            state = merged_customer_state(
                customer.state if from_batch and customer else None,
                customer.computed_at if from_batch and customer else -math.inf,
                read.intraday, payment.timestamp, payment.transaction_id,
            )
        except (KeyError, TypeError, ValueError) as exc:
            # An entry from another schema: score as unseen rather than fail the payment.
            log.warning("cache.malformed_entry", error=repr(exc), model_version=version)
            return Known(None, None, None, None), False
        velocity = (velocity_of(previous_times(read.intraday, payment.timestamp, payment.transaction_id), payment.timestamp)
                    if self.intraday else None)
        return Known(customer, read.terminal, state, velocity, read.needs_trim(payment.timestamp)), False

    def _from_cache(self, serving: ServingModel, payment: Payment, known: Known, degraded: bool) -> ScoreResult:
        customer = known.customer
        assert customer is not None
        base, reasons = known.entity_risk()
        risk, reasons = serving.policy.apply(base, reasons, payment.amount, known.state, serving.top_k, known.velocity)
        scored_at = customer.computed_at if known.terminal is None else max(customer.computed_at, known.terminal.computed_at)
        return ScoreResult(risk, serving.policy.decide(risk), CACHE, serving.version, reasons, scored_at, degraded)

    async def _from_model(
        self, serving: ServingModel, payment: Payment, known: Known, deadline: float, degraded: bool
    ) -> ScoreResult:
        try:
            row = features.online_features(payment.amount, payment.timestamp, known.state,
                                           known.terminal.state if known.terminal else None)
        except (KeyError, TypeError, ValueError) as exc:
            # An entry from another schema: score as unseen rather than fail the payment.
            log.warning("cache.malformed_entry", error=repr(exc), model_version=serving.version)
            known = Known(None, None, None, known.velocity)
            row = features.online_features(payment.amount, payment.timestamp, None, None)
        remaining = deadline - time.monotonic() - _ANSWER_MARGIN_S
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                prob, reasons = await serving.batcher.submit(row)
        except (TimeoutError, Overloaded) as exc:
            self._log_fallback(type(exc).__name__, serving.version)
            return self._fallback(serving, payment, known)
        if self.on_model_row is not None:
            self.on_model_row(serving.version, row, prob)
        risk, reasons = serving.policy.apply(prob, reasons, payment.amount, known.state, serving.top_k, known.velocity)
        if known.customer is None and self.cache is not None and serving is self.serving:  # never a canary's risk
            state = features.advance_customer_state(known.state, payment.amount, payment.timestamp)
            task = asyncio.get_running_loop().create_task(self._write_back(serving, payment, state))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return ScoreResult(risk, serving.policy.decide(risk), MODEL, serving.version, reasons, time.time(), degraded)

    async def _write_back(self, serving: ServingModel, payment: Payment, state: dict[str, float]) -> None:
        """A new card's entity risk (``core.entity_scoring``: its typical payment, never this
        payment's score), computed after the answer went out and written back for it."""
        assert self.cache is not None
        row = entity_scoring.customer_entity_row(state, serving.policy.typical_amount, payment.timestamp)
        try:
            with tracing.span("write_back"):
                async with asyncio.timeout(_WRITE_BACK_TIMEOUT_S):
                    risk, reasons = await serving.batcher.submit(features.online_features_many([row])[0])
        except (TimeoutError, Overloaded, ModelFailed):
            return  # the card stays unknown to the cache; its next payment goes to the model again
        entry = CacheEntry(risk_score=float(risk), state=state, model_version=serving.version,
                           computed_at=payment.timestamp, reasons=list(reasons), origin=ONLINE,
                           generation=self.cache.generation(serving.version))
        self.cache.write_back(serving.version, [(CUSTOMER, payment.customer_id, entry)])

    def _log_fallback(self, reason: str, version: str) -> None:
        """``model.fallback``, at most one line a second (with how many since the last): a ScoreBatch
        of 1,000 new cards past its budget would otherwise write 1,000 lines inside that budget."""
        self._fallbacks += 1
        now = time.monotonic()
        if now - self._fallback_logged >= 1.0:
            log.warning("model.fallback", reason=reason, model_version=version, fallbacks=self._fallbacks)
            self._fallback_logged, self._fallbacks = now, 0

    def _fallback(self, serving: ServingModel, payment: Payment, known: Known) -> ScoreResult:
        """The model could not answer in time: the cached entity risk (0 when none) with the
        payment-level policy on top, flagged degraded, and never a weaker decision than
        ``fallback_min_decision`` (fail closed: REVIEW by default, so an overloaded service never
        silently approves what the model might have declined)."""
        base, reasons = known.entity_risk()
        risk, reasons = serving.policy.apply(base, reasons, payment.amount, known.state, serving.top_k, known.velocity)
        floor = {APPROVE: 0.0, REVIEW: serving.policy.review, DECLINE: serving.policy.decline}[self.fallback_min_decision]
        if risk < floor or not reasons:
            risk = max(risk, floor)
            reasons = [("MODEL_UNAVAILABLE", "", 0.0), *reasons][: serving.top_k]
        return ScoreResult(risk, serving.policy.decide(risk), FALLBACK, serving.version, reasons, time.time(), True)

    async def drain(self) -> None:
        """Wait for the background write-backs (on shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
