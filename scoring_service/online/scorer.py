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

What the answer trusts (docs/security.md, "Trust boundaries"): the time is ours (``trusted_time``);
a card or terminal the batch's sealed manifest names whose entry is missing or rejected, or a known
card whose cache could not be read, is answered degraded and at least ``fallback_min_decision``
(``_state_lost``), never as a new card; the card's last hour as this process saw it is merged into
its intraday list (``online/recent_payments.py``).

Length: over 350 lines because every path of one answer (cache, model, fallback, lost state) and
the one floor they share are read together here; the rest of the request path lives apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter

from scoring_service.adapters.model.gbdt import GbdtModel
from scoring_service.adapters.redis.entity_cache import (
    CUSTOMER,
    TERMINAL,
    CacheEntry,
    CacheRead,
    CacheUnavailable,
    EntityCache,
)
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core import entity_scoring, features
from scoring_service.core.cache_layout import BATCH, ONLINE
from scoring_service.core.features.intraday import IntradayPayment, merged_customer_state, previous_times
from scoring_service.core.features.velocity import Velocity, velocity_of
from scoring_service.core.policy import APPROVE, DECLINE, REVIEW, Policy, Reason, combine_entities
from scoring_service.core.validation import Payment
from scoring_service.logging import get_logger
from scoring_service.online import telemetry, tracing
from scoring_service.online.batcher import MicroBatcher, ModelFailed, Overloaded
from scoring_service.online.options import Clock, ModelOptions, ReasonMethod, ScoringMode, TimeTrust
from scoring_service.online.recent_payments import RecentPayments

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
    # Why state a batch run holds for this payment's card or terminal could not be used (entry missing or
    # rejected although the generation's manifest names the entity, or Redis unreadable for a known card):
    # the answer is degraded and at least the floor (``Scorer.fallback_min_decision``). None: nothing lost.
    lost: str | None = None
    generation: str | None = None  # the cache generation read (None: none read)
    at: float | None = None  # the payment's trusted time its intraday payments were merged up to (None: no read)

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


INTEGRITY = Counter("fraudscore_cache_integrity_total",
                    "Payments whose card or terminal a batch run knows but whose state could not be used "
                    "(entry missing or rejected, cache unreadable): answered degraded, at least the floor.", ["reason"])
_INTEGRITY_LOG_EVERY_S = 10.0


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
        fallback_min_decision: str = REVIEW, time_trust: TimeTrust | None = None,
    ) -> None:
        self.cache = cache
        self.time_trust = time_trust or TimeTrust()
        self.recent = RecentPayments()  # the cards' last hour as this process saw it (online/recent_payments.py)
        self.mode = mode
        self.fallback_min_decision = fallback_min_decision  # fail closed: a FALLBACK answer is at least this
        self.intraday = intraday  # False: no intraday reads or records (cached state only, velocity unknown)
        self.serving: ServingModel | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._fallbacks = 0  # FALLBACK answers since the last model.fallback line
        self._fallback_logged = -math.inf
        self._integrity_unlogged: dict[str, int] = {}  # cache.integrity reasons since the last line
        self._integrity_logged = -math.inf
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
        # a ScoreBatch's items were read (read_many) at the time they are scored at: the same clock reading
        payment, at = self.trusted_time(payment, known[0].at if known is not None else None)
        known_, degraded = known if known is not None else await self._read(serving.version, payment, at, deadline)
        if self.cache is not None and self.intraday:
            self.cache.record_payment(payment.customer_id, at, payment.amount, payment.transaction_id,
                                      trim=known_.trim_intraday)
            self.recent.record(payment.customer_id, IntradayPayment(at, payment.amount, payment.transaction_id))
        if canary is None and known_.from_batch and self.mode is ScoringMode.CACHE_FIRST:
            result = self._from_cache(serving, payment, known_, degraded)
        else:  # a canary card is always scored by the canary model (the cache holds the active version's risks)
            result = await self._from_model(canary or serving, payment, known_, deadline, degraded)
        if known_.lost is not None:
            result = self._state_lost(canary or serving, result, known_.lost)
        for observe in self.observers:
            observe(payment, known_, result)
        return result

    def trusted_time(self, payment: Payment, now: float | None = None) -> tuple[Payment, float]:
        """(the payment with the timestamp its features use, the time its velocity and intraday order use).

        The service's clock (default): velocity and the intraday list use the time the payment is
        scored, whatever the caller stamped; the caller's timestamp is kept for the features only
        within ``max_clock_skew_s`` of it, else replaced by ours. So 12 payments sent in one second
        are 12 payments in one second, stamped two hours apart or not. ``event``: the caller's
        timestamp for both (replays, backtests). ``now``: the service's time to use (default: read the clock)."""
        if self.time_trust.clock is Clock.EVENT:
            return payment, payment.timestamp
        if now is None:
            now = time.time()
        if abs(payment.timestamp - now) > self.time_trust.max_clock_skew_s:
            payment = dataclasses.replace(payment, timestamp=now)
        return payment, now

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
            return [self._unreadable(serving.version, p) for p in payments]
        return [self._known(serving.version, p, at, read)
                for (p, at), read in zip(map(self.trusted_time, payments), reads, strict=True)]

    async def _read(self, version: str, payment: Payment, at: float, deadline: float) -> tuple[Known, bool]:
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
            return self._unreadable(version, payment)
        return self._known(version, payment, at, read)

    def _unreadable(self, version: str, payment: Payment) -> tuple[Known, bool]:
        """The cache could not be read: a card a batch run knows is judged without its history (floored)."""
        assert self.cache is not None
        lost = "cache_unavailable" if self.cache.knows(version, CUSTOMER, payment.customer_id) else None
        return Known(None, None, None, None, lost=lost), True

    @staticmethod
    def _count_unavailable(exc: CacheUnavailable, lookups: int) -> None:
        telemetry.CACHE_LOOKUPS.labels("error").inc(lookups)
        telemetry.REDIS_ERRORS.labels("breaker_open" if "breaker" in str(exc) else "error").inc()

    def _known(self, version: str, payment: Payment, at: float, read: CacheRead) -> tuple[Known, bool]:
        """What ``read`` knows for the payment, its intraday payments merged up to ``at`` (``trusted_time``)."""
        assert self.cache is not None
        customer = read.customer
        telemetry.CACHE_LOOKUPS.labels("miss" if customer is None else "hit").inc()
        if self.intraday:
            intraday, erased = self.recent.merged(payment.customer_id, read.intraday, at)
            if erased:
                INTEGRITY.labels("intraday_missing").inc(erased)
            read = dataclasses.replace(read, intraday=intraday)
        from_batch = customer is not None and customer.origin == BATCH
        try:
            state = merged_customer_state(
                customer.state if from_batch and customer else None,
                customer.computed_at if from_batch and customer else -math.inf,
                read.intraday, at, payment.transaction_id,
            )
        except (KeyError, TypeError, ValueError) as exc:
            # An entry from another schema: score as unseen rather than fail the payment.
            log.warning("cache.malformed_entry", error=repr(exc), model_version=version)
            return Known(None, None, None, None, generation=read.generation), False
        velocity = (velocity_of(previous_times(read.intraday, at, payment.transaction_id), at)
                    if self.intraday else None)
        lost = self._lost(version, payment, read)
        return (Known(customer, read.terminal, state, velocity, self.cache.needs_trim(read, at), lost, read.generation, at),
                lost is not None)

    def _lost(self, version: str, payment: Payment, read: CacheRead) -> str | None:
        """Why a batch run's state for the card or the terminal is not in ``read`` though its manifest
        names the entity (``core.known_entities``): a deleted, forged or evicted entry. Misses only:
        a hit needs no evidence."""
        assert self.cache is not None
        if read.customer is None and self.cache.knows(version, CUSTOMER, payment.customer_id, read.generation):
            return "customer_rejected" if read.customer_rejected else "customer_missing"
        if read.terminal is None and self.cache.knows(version, TERMINAL, payment.terminal_id, read.generation):
            return "terminal_rejected" if read.terminal_rejected else "terminal_missing"
        return None

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
            known = dataclasses.replace(known, customer=None, terminal=None, state=None)  # lost is kept
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
        # A new card's entity risk is written back (never a canary's; never for a card whose batch state is lost:
        # that would turn a deleted entry into a new card's)
        if (known.customer is None and known.lost is None and known.generation is not None and self.cache is not None
                and serving is self.serving):
            state = features.advance_customer_state(known.state, payment.amount, payment.timestamp)
            task = asyncio.get_running_loop().create_task(self._write_back(serving, payment, state, known.generation))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return ScoreResult(risk, serving.policy.decide(risk), MODEL, serving.version, reasons, time.time(), degraded)

    async def _write_back(self, serving: ServingModel, payment: Payment, state: dict[str, float], generation: str) -> None:
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
                           generation=generation)  # the batch generation it was read under (stored under "0")
        self.cache.write_back(serving.version, [(CUSTOMER, payment.customer_id, entry)])

    def _log_fallback(self, reason: str, version: str) -> None:
        """``model.fallback``, at most one line a second (with how many since the last): a ScoreBatch
        of 1,000 new cards past its budget would otherwise write 1,000 lines inside that budget."""
        self._fallbacks += 1
        now = time.monotonic()
        if now - self._fallback_logged >= 1.0:
            log.warning("model.fallback", reason=reason, model_version=version, fallbacks=self._fallbacks)
            self._fallback_logged, self._fallbacks = now, 0

    def _floor(self, serving: ServingModel, risk: float, reasons: list[Reason], code: str,
               always: bool = False) -> tuple[float, list[Reason]]:
        """``risk`` raised to the floor's threshold (``fallback_min_decision``), ``code`` first among the
        reasons when it was raised (or when there were none, or ``always``)."""
        floor = {APPROVE: 0.0, REVIEW: serving.policy.review, DECLINE: serving.policy.decline}[self.fallback_min_decision]
        if risk < floor or not reasons or always:
            risk = max(risk, floor)
            reasons = [(code, "", 0.0), *reasons][: serving.top_k]
        return risk, reasons

    def _state_lost(self, serving: ServingModel, result: ScoreResult, reason: str) -> ScoreResult:
        """A payment of an entity the batch knows, judged without its state: degraded, at least the floor
        (the same floor as FALLBACK), counted and logged at most every ``_INTEGRITY_LOG_EVERY_S``."""
        INTEGRITY.labels(reason).inc()
        self._integrity_unlogged[reason] = self._integrity_unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._integrity_logged >= _INTEGRITY_LOG_EVERY_S:
            log.warning("cache.integrity", model_version=serving.version, payments=self._integrity_unlogged,
                        note="batch state missing or rejected for entities its manifest names: answered degraded, floored")
            self._integrity_logged, self._integrity_unlogged = now, {}
        risk, reasons = self._floor(serving, result.risk_score, result.reasons, "ENTITY_STATE_UNAVAILABLE",
                                    always=True)
        return ScoreResult(risk, serving.policy.decide(risk), result.source, result.model_version, reasons,
                           result.scored_at, True)

    def _fallback(self, serving: ServingModel, payment: Payment, known: Known) -> ScoreResult:
        """The model could not answer in time: the cached entity risk (0 when none) with the
        payment-level policy on top, flagged degraded, and never a weaker decision than
        ``fallback_min_decision`` (fail closed: REVIEW by default, so an overloaded service never
        silently approves what the model might have declined)."""
        base, reasons = known.entity_risk()
        risk, reasons = serving.policy.apply(base, reasons, payment.amount, known.state, serving.top_k, known.velocity)
        risk, reasons = self._floor(serving, risk, reasons, "MODEL_UNAVAILABLE")
        return ScoreResult(risk, serving.policy.decide(risk), FALLBACK, serving.version, reasons, time.time(), True)

    async def drain(self) -> None:
        """Wait for the background write-backs (on shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
