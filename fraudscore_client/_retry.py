"""When a failed call may be tried again, and after how long: one rule for the sync and asyncio clients.

A retry must never make a payment count twice or answer after the caller stopped waiting, so:

- ``UNAVAILABLE``: retried. The call found no connection (refused, reset before the request was
  written, the channel in TRANSIENT_FAILURE); the service did not run it. (A server that is shutting
  down also answers UNAVAILABLE without scoring.) Scoring is idempotent per transaction id anyway:
  every attempt of one call sends the same ``transaction_id`` and ``request_id``.
- ``RESOURCE_EXHAUSTED`` with the trailing ``grpc-retry-pushback-ms``: retried after that many
  milliseconds (the admission control refused the call before running it and says when to come
  back). Without a valid pushback (e.g. a message over the size limit) it is final, as gRPC's own
  retry policy does for a negative or malformed pushback.
- ``DEADLINE_EXCEEDED``, ``CANCELLED``, ``INTERNAL``, ``UNKNOWN``: final, the call may have been processed.
- ``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ``PERMISSION_DENIED`` and everything else: final, the
  same request would get the same answer.
- Every attempt shares the caller's one overall deadline: an attempt's timeout is what is left of
  it, and a retry whose wait would not leave any time for the call is not made (the last error is
  raised at once, so the caller can apply its fallback in time).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

PUSHBACK_KEY = "grpc-retry-pushback-ms"
MIN_ATTEMPT_S = 0.001  # an attempt left less than this after the wait is not worth making


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` in all (1 = no retry); exponential backoff with full jitter for UNAVAILABLE."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.01
    max_backoff_s: float = 0.2
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff: initial and max must be >= 0, multiplier >= 1")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based): full jitter up to the ceiling."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


def pushback_s(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's ``grpc-retry-pushback-ms`` in seconds; None when absent, negative or malformed."""
    for key, value in trailing_metadata or ():
        if key.lower() != PUSHBACK_KEY:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        try:
            ms = int(text.strip())
        except ValueError:
            return None
        return ms / 1000.0 if ms >= 0 else None
    return None


def retry_delay(
    policy: RetryPolicy,
    code: grpc.StatusCode | None,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
    attempt: int,
    remaining_s: float,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before the next attempt, or None when the failure is final.

    ``attempt`` is the number of attempts made so far, ``remaining_s`` what is left of the deadline.
    """
    if attempt >= policy.max_attempts:
        return None
    if code is grpc.StatusCode.UNAVAILABLE:
        delay = policy.backoff_s(attempt, rng)
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushed = pushback_s(trailing_metadata)
        if pushed is None:
            return None
        delay = pushed
    else:
        return None
    # The next attempt needs time of its own after the wait: never sleep into the caller's deadline.
    return delay if delay + MIN_ATTEMPT_S <= remaining_s else None
