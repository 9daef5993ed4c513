"""One call's attempts inside its one deadline: the rule the sync and asyncio clients share.

The two clients differ only in how they call and wait (``await``, ``asyncio.sleep``); what an
attempt may be made, with which timeout and metadata, what is counted by the throttle and what
ends the call is here once::

    attempts = Attempts(...)
    while True:
        remaining, metadata = attempts.next()     # raises ScoringError: deadline gone, throttled
        try:
            answer = method(request, timeout=remaining, metadata=metadata)
        except grpc.RpcError as exc:
            delay = attempts.failed(exc)          # raises ScoringError when the failure is final
        else:
            attempts.answered()
            return answer
        sleep(delay)
"""

from __future__ import annotations

import random
import time

import grpc

from fraudscore_client._channel import ChannelConfig
from fraudscore_client._errors import ScoringError
from fraudscore_client._retry import RetryPolicy, retry_delay
from fraudscore_client._throttle import AdaptiveThrottle, after_attempt, before_attempt


class Attempts:
    def __init__(self, timeout_s: float, policy: RetryPolicy, throttle: AdaptiveThrottle | None, config: ChannelConfig,
                 rng: random.Random | None) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.policy = policy
        self.throttle = throttle
        self.config = config
        self.rng = rng
        self.made = 0

    def next(self) -> tuple[float, tuple[tuple[str, str], ...]]:
        """The next attempt's timeout (what is left of the deadline) and metadata."""
        self.made += 1
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ScoringError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call", attempts=self.made - 1)
        before_attempt(self.throttle, self.made)
        return remaining, self.config.attempt_metadata(remaining)

    def answered(self) -> None:
        after_attempt(self.throttle, None)

    def failed(self, exc: grpc.RpcError) -> float:
        """The wait before the next attempt; raises ``ScoringError`` when the failure is final."""
        code = exc.code() if hasattr(exc, "code") else None
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        after_attempt(self.throttle, code)
        delay = retry_delay(self.policy, code, trailing, self.made, self.deadline - time.monotonic(), self.rng)
        if delay is None:
            raise ScoringError.from_rpc_error(exc, attempts=self.made) from None
        return delay
