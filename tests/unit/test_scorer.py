"""The Score use case with fakes for the cache and the model (the real ones are in tests/e2e)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from scoring_service.adapters.redis.entity_cache import CacheRead, CacheUnavailable
from scoring_service.core import features
from scoring_service.core.cache_layout import CacheEntry
from scoring_service.core.features.intraday import IntradayPayment
from scoring_service.core.policy import Policy
from scoring_service.core.validation import Payment
from scoring_service.online.batcher import MicroBatcher
from scoring_service.online.options import Clock, ScoringMode, TimeTrust
from scoring_service.online.scorer import CACHE, FALLBACK, MODEL, Scorer, ServingModel

POLICY = Policy(review=0.3, decline=0.7, high_amount=220.0, amount_ratio_review=3.0, amount_ratio_decline=5.0)
PAYMENT = Payment("t1", "c1", "m1", 30.0, "EUR", time.time())


def _state(n=10, amount=30.0):
    state = None
    for _ in range(n):
        state = features.advance_customer_state(state, amount, time.time() - 3600)
    return state


class FakeCache:
    """The EntityCache's interface in memory: entries, write-backs and intraday payments (deduplicated
    by transaction id, as the sorted set's members are)."""

    def __init__(self, customer=None, terminal=None, fail=False, known=()):
        self.customer, self.terminal, self.fail = customer, terminal, fail
        self.known = set(known)  # (kind, id) a batch generation's manifest names
        self.written = []
        self.intraday: dict[str, IntradayPayment] = {}

    def generation(self, _version):
        return "0"

    async def read(self, *_args, intraday=True):
        if self.fail:
            raise CacheUnavailable("down")
        customer = self.customer or next((e for kind, _, e in self.written if kind == "c"), None)
        payments = sorted(self.intraday.values(), key=lambda p: p.timestamp) if intraday else []
        return CacheRead(customer, self.terminal, payments, generation="0")

    def knows(self, _version, kind, entity_id, _generation=None):
        return (kind, entity_id) in self.known

    def needs_trim(self, read, now):
        return read.needs_trim(now)

    def record_payment(self, customer_id, timestamp, amount, transaction_id, trim=True):
        self.intraday.setdefault(transaction_id, IntradayPayment(timestamp, amount, transaction_id))

    def write_back(self, version, entries):
        self.written.extend(entries)


def _serving(delay_s=0.0, prob=0.42):
    def fn(x):
        time.sleep(delay_s)
        assert x.shape[1] == len(features.FEATURE_NAMES)
        return np.full(len(x), prob), [[("HIGH_X", "x", 1.0)]] * len(x)

    batcher = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
    record = SimpleNamespace(version="v1")
    return ServingModel(record=record, model=SimpleNamespace(device="cpu"), policy=POLICY, batcher=batcher)


def _run(scorer, payment=PAYMENT, budget_s=0.1):
    async def main():
        scorer.serving.batcher.start()
        try:
            result = await scorer.score(payment, time.monotonic() + budget_s)
            await scorer.drain()  # the background write-back, if any
            return result
        finally:
            await scorer.serving.batcher.stop()

    return asyncio.run(main())


def _scorer(cache, mode=ScoringMode.CACHE_FIRST, **serving):
    s = Scorer(cache, mode)
    s.serving = _serving(**serving)
    return s


def test_miss_runs_the_model_and_writes_the_customer_back():
    cache = FakeCache()
    result = _run(_scorer(cache))
    assert result.source == MODEL and result.risk_score == 0.42 and result.decision == "REVIEW"
    assert result.reasons == [("HIGH_X", "x", 1.0)] and not result.degraded
    (kind, entity, entry), = cache.written
    assert (kind, entity) == ("c", "c1") and entry.risk_score == 0.42 and entry.model_version == "v1"
    assert entry.state["nb_tx_30d"] >= 1


def test_hit_answers_from_cache_without_the_model():
    entry = CacheEntry(0.05, _state(), "v1", 123.0, [("A", "a", 0.2)])
    result = _run(_scorer(FakeCache(customer=entry), delay_s=5.0))  # a model call would blow the budget
    assert result.source == CACHE and result.risk_score == 0.05 and result.scored_at == 123.0
    assert result.reasons[0][0] == "A"


def test_always_model_uses_the_model_even_on_a_hit():
    entry = CacheEntry(0.05, _state(), "v1", 123.0)
    cache = FakeCache(customer=entry)
    result = _run(_scorer(cache, mode=ScoringMode.ALWAYS_MODEL))
    assert result.source == MODEL and result.risk_score == 0.42
    assert cache.written == []  # a known customer is not overwritten by the online path


def test_cache_down_is_degraded_but_answered_by_the_model():
    result = _run(_scorer(FakeCache(fail=True)))
    assert result.source == MODEL and result.degraded


def test_model_past_the_budget_gives_a_degraded_fallback_in_time():
    scorer = _scorer(FakeCache(), delay_s=0.5)
    started = time.monotonic()
    result = _run(scorer, budget_s=0.05)
    assert time.monotonic() - started < 0.45  # returned before the model finished
    assert result.source == FALLBACK and result.degraded
    # fail closed: the model was skipped, so the payment is not approved unseen
    assert result.reasons[0][0] == "MODEL_UNAVAILABLE" and result.decision == "REVIEW"
    assert result.risk_score == POLICY.review


def test_the_fallback_floor_is_configurable_down_to_fail_open():
    scorer = _scorer(FakeCache(), delay_s=0.5)
    scorer.fallback_min_decision = "APPROVE"
    result = _run(scorer, budget_s=0.05)
    assert result.source == FALLBACK and result.decision == "APPROVE" and result.reasons[0][0] == "MODEL_UNAVAILABLE"
    scorer = _scorer(FakeCache(), delay_s=0.5)
    scorer.fallback_min_decision = "DECLINE"
    assert _run(scorer, budget_s=0.05).decision == "DECLINE"


def test_fallback_still_applies_the_amount_policy():
    payment = Payment("t1", "c1", "m1", 500.0, "EUR", time.time())
    result = _run(_scorer(FakeCache(), delay_s=0.5), payment=payment, budget_s=0.05)
    assert result.source == FALLBACK and result.decision == "DECLINE"
    assert result.reasons[0][0] == "AMOUNT_ABOVE_HIGH_LIMIT"


def test_a_malformed_cached_state_is_treated_as_unseen_not_an_error():
    entry = CacheEntry(0.05, {"unexpected": 1.0}, "v1", 123.0)
    result = _run(_scorer(FakeCache(customer=entry), mode=ScoringMode.ALWAYS_MODEL))
    assert result.source == MODEL and result.risk_score == 0.42


# ---- issue 21: what the answer trusts (the batch's manifest, our clock, the floor)
def test_a_known_card_whose_entry_is_missing_is_floored_never_scored_as_new_nor_written_back():
    cache = FakeCache(known={("c", "c1")})
    result = _run(_scorer(cache, prob=0.01))
    assert result.degraded and result.decision == "REVIEW"  # the model's 0.01 would approve
    assert result.reasons[0][0] == "ENTITY_STATE_UNAVAILABLE"
    assert cache.written == []  # a deleted entry must not become a new card's


def test_a_new_cards_model_answer_stands_without_the_floor():
    cache = FakeCache(known={("c", "another-card")})
    result = _run(_scorer(cache, prob=0.01))
    assert (result.source, result.decision, result.degraded) == (MODEL, "APPROVE", False)
    assert [kind for kind, _, _ in cache.written] == ["c"]


def test_a_known_terminal_whose_entry_is_missing_floors_a_cached_card():
    entry = CacheEntry(0.05, _state(), "v1", time.time())
    result = _run(_scorer(FakeCache(customer=entry, known={("t", "m1")})))
    assert (result.source, result.decision, result.degraded) == (CACHE, "REVIEW", True)


def test_a_known_card_is_floored_when_the_cache_cannot_be_read_a_new_one_is_not():
    known = _run(_scorer(FakeCache(fail=True, known={("c", "c1")}), prob=0.01))
    assert (known.source, known.decision, known.degraded) == (MODEL, "REVIEW", True)
    new = _run(_scorer(FakeCache(fail=True), prob=0.01))
    assert (new.source, new.decision, new.degraded) == (MODEL, "APPROVE", True)


def test_the_floor_of_lost_state_is_the_fallback_floor_and_configurable():
    scorer = _scorer(FakeCache(known={("c", "c1")}), prob=0.01)
    scorer.fallback_min_decision = "DECLINE"
    assert _run(scorer).decision == "DECLINE"


def test_the_service_clock_replaces_a_timestamp_past_the_skew_and_keeps_one_within():
    scorer = Scorer(FakeCache())
    now = time.time()
    far, at = scorer.trusted_time(Payment("t", "c", "m", 1.0, "EUR", now - 7200))
    assert abs(far.timestamp - now) < 5 and abs(at - now) < 5
    near, at = scorer.trusted_time(Payment("t", "c", "m", 1.0, "EUR", now - 60))
    assert near.timestamp == now - 60 and abs(at - now) < 5  # features: the caller's; velocity: ours
    event = Scorer(FakeCache(), time_trust=TimeTrust(Clock.EVENT))
    assert event.trusted_time(Payment("t", "c", "m", 1.0, "EUR", now - 7200))[1] == now - 7200


def test_a_scorebatch_item_is_recorded_at_the_time_it_was_read_at(monkeypatch):
    # read_many merges each item's intraday payments up to the service's time; score() records the
    # payment at that same time (one clock reading per item, not a second one)
    class ManyCache(FakeCache):
        async def read_many(self, _version, pairs, _timeout, intraday=True):
            return [await self.read() for _ in pairs]

    cache = ManyCache()
    scorer = _scorer(cache)
    clock = iter([1_000.0, 2_000.0, 3_000.0])
    monkeypatch.setattr("scoring_service.online.scorer.time.time", lambda: next(clock))
    payment = Payment("t9", "c9", "m1", 30.0, "EUR", 1_000.0)

    async def main():
        scorer.serving.batcher.start()
        try:
            [known] = await scorer.read_many([payment], time.monotonic() + 0.1)
            await scorer.score(payment, time.monotonic() + 0.1, known)
            return known
        finally:
            await scorer.serving.batcher.stop()

    known = asyncio.run(main())
    assert known[0].at == 1_000.0 and cache.intraday["t9"].timestamp == 1_000.0


def test_a_known_card_with_a_malformed_terminal_state_is_still_floored_and_not_written_back():
    cache = FakeCache(terminal=CacheEntry(0.01, {"not": 1.0}, "v1", time.time()), known={("c", "c1")})
    result = _run(_scorer(cache, prob=0.01))
    assert result.degraded and result.decision == "REVIEW" and cache.written == []
