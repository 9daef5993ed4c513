"""The client's adaptive throttling: a fake clock for the rule, the fake service for the client."""

from __future__ import annotations

import random

import grpc
import pytest

from fraudscore_client import AdaptiveThrottle, FraudScoreClient, ScoringError
from fraudscore_client._throttle import PADDING
from tests.unit.test_client_retries import FakeScoring, fake, fake_server  # noqa: F401 - the fixtures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_while_the_service_accepts_everything_nothing_is_refused_locally():
    throttle = AdaptiveThrottle(k=2.0, clock=Clock(), rng=random.Random(1))
    for _ in range(10_000):
        assert throttle.allow()
        throttle.outcome(accepted=True)
    assert throttle.reject_probability() == 0.0


def test_calls_in_flight_are_no_evidence_of_refusal():
    # a cold client sends many calls at once: none has an outcome yet, and none may be refused
    # locally (counting them as requests without accepts refused the 2nd of 4 with p = 1/9)
    throttle = AdaptiveThrottle(k=1.1, clock=Clock(), rng=random.Random(5))
    assert all(throttle.allow() for _ in range(200))
    assert throttle.reject_probability() == 0.0
    for _ in range(200):
        throttle.outcome(accepted=True)
    assert throttle.reject_probability() == 0.0


def test_a_client_sends_about_k_times_what_an_overloaded_service_accepts():
    clock = Clock()
    for k in (1.1, 2.0):
        throttle = AdaptiveThrottle(k=k, window_s=10, clock=clock, rng=random.Random(7))
        sent = accepted = 0
        taken: dict[int, int] = {}
        for _ in range(30_000):  # 1,000 calls a second for 30 s; the service takes at most 100 a second
            clock.now += 0.001
            if throttle.allow():
                sent += 1
                second = int(clock.now)
                ok = taken.get(second, 0) < 100
                taken[second] = taken.get(second, 0) + ok
                accepted += ok
                throttle.outcome(accepted=ok)
        assert accepted > 2_500  # the service still works at capacity
        # without the throttle all 30,000 are sent; with it, about k times the accepted
        assert sent < k * accepted * 1.15 + 100, (k, sent, accepted)


def test_one_refusal_does_not_make_a_quiet_client_refuse_half_its_calls_and_the_window_forgets():
    clock = Clock()
    throttle = AdaptiveThrottle(k=2.0, window_s=10, clock=clock)
    assert throttle.allow()
    throttle.outcome(accepted=False)  # sent, refused by the service
    assert throttle.reject_probability() == pytest.approx(1 / (1 + PADDING))
    for _ in range(50):
        if throttle.allow():  # a local refusal is counted at once, a sent call when it ends
            throttle.outcome(accepted=False)
    assert throttle.reject_probability() > 0.8
    clock.now += 10.5  # the window slid past every count
    assert throttle.reject_probability() == 0.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="k: must be >= 1"):
        AdaptiveThrottle(k=0.5)
    with pytest.raises(ValueError, match="window_s"):
        AdaptiveThrottle(window_s=0.1)


def test_the_client_stops_sending_what_the_service_keeps_refusing(fake: FakeScoring,  # noqa: F811
                                                                  fake_server: tuple[FakeScoring, str]) -> None:  # noqa: F811
    fake.script[:] = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)] * 200  # overloaded, no pushback: final each time
    codes, local = [], 0
    throttle = AdaptiveThrottle(k=2.0, rng=random.Random(3))
    with FraudScoreClient(fake_server[1], timeout_s=2.0, retries=0, throttle=throttle) as c:
        for _ in range(100):
            with pytest.raises(ScoringError) as exc:
                c.score("c1", "t1", 10.0)
            codes.append(exc.value.code)
            local += exc.value.attempts == 0 and "not sent" in exc.value.details
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # the caller's fallback sees one code either way
    assert len(fake.seen) + local == 100 and local > 50  # most were never sent
    fake.script.clear()  # the service recovers: answers are accepted and the client sends again
    with FraudScoreClient(fake_server[1], timeout_s=2.0, retries=0, throttle=None) as c:
        assert c.score("c1", "t1", 10.0).decision == "APPROVE"
    with FraudScoreClient(fake_server[1], timeout_s=2.0, throttle=2.0) as c:
        assert c.throttle is not None and c.throttle.k == 2.0


def test_only_a_call_s_first_attempt_is_throttled_its_invited_retries_are_counted():
    from fraudscore_client._throttle import after_attempt, before_attempt

    class Always:
        def random(self) -> float:
            return 0.0  # refuse whenever the probability is above 0

    throttle = AdaptiveThrottle(k=1.1, clock=Clock(), rng=Always())  # type: ignore[arg-type]
    for _ in range(40):
        throttle.outcome(accepted=False)  # 40 attempts, none accepted: the service is refusing
    assert throttle.reject_probability() > 0.8
    with pytest.raises(ScoringError, match="not sent"):
        before_attempt(throttle, 1)
    before = throttle.reject_probability()
    before_attempt(throttle, 2)  # a retry after the service's pushback: sent, never refused here
    after_attempt(throttle, grpc.StatusCode.RESOURCE_EXHAUSTED)  # and counted when refused again
    assert throttle.reject_probability() > before
    after_attempt(throttle, None)  # an answer is an accept
    assert throttle.reject_probability() < before + 0.01


def test_after_a_surge_the_client_sends_more_as_soon_as_the_service_accepts_everything():
    # second 0: a cold flood, the service accepts 300 of 1,000 (its refusals eat its CPU);
    # then 1,000 calls a second, and the service would take up to 800 a second
    clock = Clock()
    throttle = AdaptiveThrottle(k=1.1, window_s=10, clock=clock, rng=random.Random(11))
    for _ in range(1_000):  # all sent at once, before any outcome
        assert throttle.allow()
    for i in range(1_000):
        throttle.outcome(accepted=i < 300)
    sent_per_second, accepted_per_second = [], []
    for _ in range(6):
        clock.now += 1.0
        sent = 0
        for _ in range(1_000):
            if throttle.allow():
                sent += 1
                throttle.outcome(accepted=sent <= 800)
        sent_per_second.append(sent)
        accepted_per_second.append(min(sent, 800))
    # the calls refused locally in a second the service refused nothing in are not counted as
    # unmet demand, so the client sends much more each second (the book's rule: about 1.1x a window)
    assert sent_per_second[0] < 500, sent_per_second
    assert sent_per_second[3] > 1.4 * sent_per_second[0], sent_per_second
    assert min(accepted_per_second[3:]) >= 760, sent_per_second  # the service works near its capacity
