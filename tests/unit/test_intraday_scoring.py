"""The hybrid: what a new card's write-back stores, and how intraday payments reach the next answer.

The Score use case with an in-memory cache (tests/unit/test_scorer.py's FakeCache: entries, write-
backs, intraday payments deduplicated by transaction id) and a fake model whose score is
``amount / 1000`` and whose one reason names the row's amount and 1-day count, so each answer says
which features the model saw. The real Redis and service are in tests/integration and tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from scoring_service.core import features
from scoring_service.core.cache_layout import ONLINE, CacheEntry
from scoring_service.core.policy import Policy
from scoring_service.core.validation import Payment
from scoring_service.online.batcher import MicroBatcher
from scoring_service.online.options import Clock, ScoringMode, TimeTrust
from scoring_service.online.scorer import CACHE, MODEL, Scorer, ServingModel
from tests.unit.test_scorer import FakeCache

AMOUNT = features.FEATURE_NAMES.index("amount")
NB_TX_1D = features.FEATURE_NAMES.index("customer_nb_tx_1d")
POLICY = Policy(review=0.3, decline=0.7, high_amount=2000.0, amount_ratio_review=3.0, amount_ratio_decline=5.0,
                velocity_1h_review=5.0, velocity_1h_decline=15.0, typical_amount=40.0)
T0 = time.time() - 600


def _serving(seen: list[np.ndarray]) -> ServingModel:
    def fn(x: np.ndarray):
        seen.extend(np.array(x, copy=True))
        return (np.clip(x[:, AMOUNT] / 1000.0, 0.0, 1.0),
                [[("ROW", f"amount={r[AMOUNT]:g} nb_tx_1d={r[NB_TX_1D]:g}", float(r[AMOUNT]))] for r in x])

    batcher = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
    return ServingModel(record=SimpleNamespace(version="v1"), model=SimpleNamespace(device="cpu"), policy=POLICY,
                        batcher=batcher)


def _pay(n: int, amount: float, at: float, customer: str = "card") -> Payment:
    return Payment(f"tx{n}", customer, "m1", amount, "EUR", at)


def _score_all(scorer: Scorer, payments: list[Payment]):
    async def main():
        scorer.serving.batcher.start()
        try:
            out = []
            for p in payments:
                out.append(await scorer.score(p, time.monotonic() + 1.0))
                await scorer.drain()
            return out
        finally:
            await scorer.serving.batcher.stop()

    return asyncio.run(main())


def _scorer(cache: FakeCache, seen: list[np.ndarray], mode: ScoringMode = ScoringMode.CACHE_FIRST) -> Scorer:
    scorer = Scorer(cache, mode, time_trust=TimeTrust(Clock.EVENT))  # the tests' payments follow a timeline of their own
    scorer.serving = _serving(seen)
    return scorer


def test_a_new_cards_write_back_is_its_entity_risk_not_its_first_payments_score():
    cache, seen = FakeCache(), []
    first, = _score_all(_scorer(cache, seen), [_pay(1, 5000.0, T0)])
    assert first.source == MODEL and first.decision == "DECLINE"  # the payment: 5000 / 1000, clipped to 1.0
    (kind, card, entry), = cache.written
    assert (kind, card, entry.origin) == ("c", "card", ONLINE)
    # The card's typical payment: one payment is not a habit, so the version's typical amount (40).
    assert entry.risk_score == pytest.approx(0.04) and entry.reasons[0][1] == "amount=40 nb_tx_1d=2"
    assert entry.state["nb_tx_1d"] == 1.0 and entry.state["sum_amount_1d"] == 5000.0


def test_after_5000_the_card_paying_10_is_judged_on_that_payment_with_its_history():
    cache, seen = FakeCache(), []
    first, second = _score_all(_scorer(cache, seen), [_pay(1, 5000.0, T0), _pay(2, 10.0, T0 + 1)])
    assert first.decision == "DECLINE"
    assert second.source == MODEL and second.decision == "APPROVE" and second.risk_score == pytest.approx(0.01)
    # its reasons are the model's for this payment, which saw the first one in the card's 1-day count
    assert second.reasons == [("ROW", "amount=10 nb_tx_1d=2", 10.0)]


def test_after_1_the_card_paying_211_is_judged_at_least_as_a_fresh_card_paying_211():
    cache, seen = FakeCache(), []
    _, after_one = _score_all(_scorer(cache, seen), [_pay(1, 1.0, T0), _pay(2, 211.0, T0 + 1)])
    fresh, = _score_all(_scorer(FakeCache(), []), [_pay(3, 211.0, T0 + 1, customer="fresh")])
    assert after_one.source == MODEL and after_one.risk_score >= fresh.risk_score
    assert after_one.reasons[0][1] == "amount=211 nb_tx_1d=2"


def test_a_burst_of_20_payments_in_a_minute_is_visible_in_the_answers():
    cache, seen = FakeCache(), []
    answers = _score_all(_scorer(cache, seen), [_pay(i, 2.0, T0 + 3 * i) for i in range(1, 21)])
    decisions = [a.decision for a in answers]
    assert decisions[:4] == ["APPROVE"] * 4 and decisions[4:14] == ["REVIEW"] * 10 and decisions[14:] == ["DECLINE"] * 6
    # the velocity reason gives the count: every payment of the burst counted once, none lost
    counts = [next(r[2] for r in a.reasons if r[0] == "CARD_VELOCITY_1H_HIGH") for a in answers[4:]]
    assert counts == [float(k) for k in range(5, 21)]
    assert seen[-1][NB_TX_1D] == 20.0


def test_the_same_transaction_sent_twice_counts_once():
    cache, seen = FakeCache(), []
    payments = [_pay(1, 30.0, T0), _pay(2, 30.0, T0 + 1), _pay(2, 30.0, T0 + 1), _pay(3, 30.0, T0 + 2)]
    answers = _score_all(_scorer(cache, seen), payments)
    same = [(a.risk_score, a.decision, a.source, a.reasons) for a in answers[1:3]]
    assert same[0] == same[1]  # a retry gets the first try's answer
    assert [row[NB_TX_1D] for row in seen if row[AMOUNT] == 30.0] == [1.0, 2.0, 2.0, 3.0]
    assert len(cache.intraday) == 3


def test_a_nightly_switch_in_the_middle_of_a_burst_loses_and_double_counts_nothing():
    """The nightly's state covers payments up to its as-of; intraday payments after it are merged."""
    cache, seen = FakeCache(), []
    burst = [_pay(i, 2.0, T0 + 3 * i) for i in range(1, 21)]
    _score_all(_scorer(cache, seen), burst[:10])
    state = None
    for p in burst[:10]:  # what the nightly computed from the event log, as of payment 10
        state = features.advance_customer_state(state, p.amount, p.timestamp)
    cache.customer = CacheEntry(0.01, state, "v1", computed_at=burst[9].timestamp, reasons=[("CARD", "x", 0.1)])
    answers = _score_all(_scorer(cache, seen, mode=ScoringMode.ALWAYS_MODEL), burst[10:])
    assert [row[NB_TX_1D] for row in seen[-10:]] == [float(k) for k in range(11, 21)]
    cache_first = _score_all(_scorer(cache, []), [_pay(21, 2.0, T0 + 63)])[0]
    assert cache_first.source == CACHE and answers[-1].decision == cache_first.decision == "DECLINE"
    assert ("CARD_VELOCITY_1H_HIGH", "customer_nb_tx_1h", 21.0) in cache_first.reasons


def test_with_intraday_state_off_the_service_keeps_and_reads_none():
    cache, seen = FakeCache(), []
    scorer = _scorer(cache, seen)
    scorer.intraday = False
    answers = _score_all(scorer, [_pay(i, 2.0, T0 + 3 * i) for i in range(1, 21)])
    assert cache.intraday == {} and all(a.decision == "APPROVE" for a in answers)
    assert all(row[NB_TX_1D] == 1.0 for row in seen if row[AMOUNT] == 2.0)  # each payment alone


def test_a_burst_erased_from_the_cache_is_still_counted_from_this_process_memory():
    """Issue 21, finding 2: ``DEL fs:1:intraday:c:<card>`` after a burst (here: the fake's list emptied)."""
    cache, seen = FakeCache(), []
    scorer = _scorer(cache, seen)
    burst = _score_all(scorer, [_pay(i, 2.0, T0 + 3 * i) for i in range(1, 9)])
    assert [a.decision for a in burst] == ["APPROVE"] * 4 + ["REVIEW"] * 4
    cache.intraday.clear()
    ninth, = _score_all(scorer, [_pay(9, 2.0, T0 + 27)])
    assert ninth.decision == "REVIEW"
    assert next(r[2] for r in ninth.reasons if r[0] == "CARD_VELOCITY_1H_HIGH") == 9.0


def test_twelve_payments_in_one_second_stamped_hours_apart_count_as_a_burst_on_the_service_clock():
    """Issue 21, finding 3: the caller's timestamps (two hours apart, ahead and back) do not spread a burst."""
    cache, seen = FakeCache(), []
    scorer = Scorer(cache)  # the default clock: ours
    scorer.serving = _serving(seen)
    now = time.time()
    stamps = [now + (7200 if i % 2 else -7200) * i for i in range(12)]
    answers = _score_all(scorer, [_pay(i, 2.0, t) for i, t in enumerate(stamps)])
    assert [a.decision for a in answers] == ["APPROVE"] * 4 + ["REVIEW"] * 8
