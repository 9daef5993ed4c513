"""Adaptive throttling: when the service refuses calls for overload, refuse some locally first.

The service sheds load with ``RESOURCE_EXHAUSTED`` before any work, but a refusal still costs it
CPU (a gRPC call in Python: docs/overload.md measures it). Past about twice its capacity the
refusals alone eat the capacity, and the service answers nobody. The cure is the one in Google's
SRE book ("Handling Overload", client-side throttling): each client keeps, over the last
``window_s``, the calls it attempted (``requests``) and those the service accepted (``accepts``:
any answer but an overload refusal), and refuses a new call itself, without sending it, with
probability

    max(0, (requests - k * accepts) / (requests + PADDING))

(the book adds 1 to the divisor; gRPC's own throttler for its lookaside balancer adds 8, so that a
client that sent little does not refuse half its calls after one refusal: so do we). So a client
sends at most about ``k`` times what the service accepts; while the service accepts everything,
nothing is refused locally. ``k = 1.1`` (our default, the book's "more aggressive" value) wastes
little of an overloaded service on refusals; ``k = 2`` (the book's default) sends twice what the
service accepts, and the service spends more on refusals (docs/overload.md). A locally refused
call raises ``ScoringError`` with ``RESOURCE_EXHAUSTED`` at once, so the caller applies its
fallback as for a server refusal. The throttle decides whether a call is sent at all; the retries
of a sent call (after the service's pushback) are counted but left to the retry rule.

Three departures from the book, each for a failure we measured:

- A sent attempt is counted when its outcome is known, not when it leaves: a call still in flight
  is no evidence that the service refuses, and counting it as a request without an accept made a
  client that had never seen a refusal refuse its own concurrent calls (four at once from a cold
  client: p = 1/9, 2/10, 3/11; it failed a CI run).
- A locally refused call is counted as a request (as the book does, so that a client the service
  keeps refusing sends less and less) only in a second in which the service refused some of the
  calls that were sent. In a second in which it accepted every call sent, it had room: the calls
  refused locally in that second were refused needlessly, and counting them as unmet demand kept
  the client refusing (with ``k = 1.1`` the book's rule lets the sending rate grow only about 1.1x
  per window).
- The window is 5 s (the book: 2 minutes; gRPC: 30 s). A sudden surge starts with a second or two
  in which the service refuses most calls (its refusals eat its CPU, so it accepts little), and
  those seconds keep every client refusing until they leave the window. With 10 s, at 3x the
  capacity (``bench/overload.py``, 8 s steps) the service kept 63-89 % of its peak goodput; with
  5 s, 90-94 % (docs/overload.md). At steady overload the counts of a few seconds are plenty
  (thousands of calls); a client that sends a few calls a second is guarded by the padding.

One definition: the benchmark's load generator (``bench/loadgen/main.go``, ``-throttle-k``,
``-throttle-window``) implements this same rule to measure what clients that use it get
(``bench/overload.py``).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

import grpc

from fraudscore_client._errors import ScoringError

BUCKET_S = 1.0
DEFAULT_K = 1.1  # the book's "aggressive" value: little of an overloaded service spent on refusals (docs/overload.md)
PADDING = 8
DEFAULT_WINDOW_S = 5.0  # see above: 10 s kept clients refusing after a surge


class AdaptiveThrottle:
    """Counts per ``BUCKET_S`` second over the last ``window_s``; thread-safe (the sync client's
    callers may share it across threads)."""

    def __init__(self, k: float = DEFAULT_K, window_s: float = DEFAULT_WINDOW_S, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if not k >= 1.0:
            raise ValueError(f"throttle k: must be >= 1, got {k}")
        if not window_s >= BUCKET_S:
            raise ValueError(f"throttle window_s: must be >= {BUCKET_S}, got {window_s}")
        self.k = k
        self.buckets = math.ceil(window_s / BUCKET_S)
        self._clock = clock
        self._rng = rng or random.Random()
        self._sent = [0] * self.buckets  # attempts sent whose outcome is known
        self._accepts = [0] * self.buckets
        self._local = [0] * self.buckets  # calls refused locally
        self._current = math.floor(clock() / BUCKET_S)
        self._lock = threading.Lock()

    def _advance(self) -> int:
        now = math.floor(self._clock() / BUCKET_S)
        if now != self._current:
            for step in range(min(now - self._current, self.buckets)):
                slot = (self._current + 1 + step) % self.buckets
                self._sent[slot] = self._accepts[slot] = self._local[slot] = 0
            self._current = now
        return now % self.buckets

    def reject_probability(self) -> float:
        with self._lock:
            self._advance()
            accepts = sum(self._accepts)
            requests = sum(sent + (local if sent > accepted else 0)
                           for sent, accepted, local in zip(self._sent, self._accepts, self._local, strict=True))
        return max(0.0, (requests - self.k * accepts) / (requests + PADDING))

    def allow(self) -> bool:
        """Whether to send the next call. A refusal is counted at once (as a request while the
        service refuses in that second); a call that is sent is counted by :meth:`outcome` when it ends."""
        p = self.reject_probability()
        refused = p > 0 and self._rng.random() < p
        if refused:
            with self._lock:
                self._local[self._advance()] += 1
        return not refused

    def outcome(self, accepted: bool) -> None:
        """Count a sent attempt once it ended: ``accepted`` unless the service refused it for overload."""
        with self._lock:
            slot = self._advance()
            self._sent[slot] += 1
            self._accepts[slot] += accepted


def throttle_of(value: AdaptiveThrottle | float | None) -> AdaptiveThrottle | None:
    """A client's ``throttle`` argument: a throttle (shared), its ``k``, or None (off)."""
    if value is None or isinstance(value, AdaptiveThrottle):
        return value
    return AdaptiveThrottle(k=float(value))


def before_attempt(throttle: AdaptiveThrottle | None, attempt: int) -> None:
    """Raise ``RESOURCE_EXHAUSTED`` without sending when the throttle refuses a call's first attempt.
    A retry is never refused here (its outcome is counted like any attempt's): the retry rule
    already bounds it (the service's pushback, the attempts, the deadline), and a caller with a few
    calls and retries must not lose the retry the service invited."""
    if throttle is None or attempt > 1:
        return
    if not throttle.allow():
        raise ScoringError(grpc.StatusCode.RESOURCE_EXHAUSTED, "not sent: the service has been refusing calls for "
                           "overload, so this client refuses some itself (adaptive throttling)", attempts=attempt - 1)


def after_attempt(throttle: AdaptiveThrottle | None, code: grpc.StatusCode | None) -> None:
    """Count an attempt's outcome: ``code`` None for an answer, else the status of its failure."""
    if throttle is not None:
        throttle.outcome(accepted=code is not grpc.StatusCode.RESOURCE_EXHAUSTED)


__all__ = ["DEFAULT_K", "AdaptiveThrottle", "after_attempt", "before_attempt", "throttle_of"]
