"""What the sync and asyncio clients share: their settings, channel, stubs and call attempts."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2_grpc

from fraudscore_client._attempts import Attempts
from fraudscore_client._channel import ChannelConfig, PathLike
from fraudscore_client._retry import RetryPolicy
from fraudscore_client._throttle import DEFAULT_K, AdaptiveThrottle, throttle_of
from scoring_service.protos import scoring_pb2_grpc

DEFAULT_TIMEOUT_S = 0.1


def _policy(retries: int | RetryPolicy) -> RetryPolicy:
    return retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_attempts=1 + retries)


def _timeout(value: float) -> float:
    if not value > 0:
        raise ValueError(f"timeout_s: must be > 0, got {value}")
    return value


class ClientBase:
    """A client of ``fraudscore.v1.FraudScoring``; subclasses say how the channel is opened.

    ``timeout_s`` is each call's overall deadline, retries included (a call may override it).
    ``retries``: how many times a call may be tried again (an int, or a :class:`RetryPolicy`);
    only failures where the service did not run the call are retried (see ``_retry``).
    ``throttle``: adaptive throttling (``_throttle``): while the service refuses calls for overload,
    the client refuses some itself without sending them, so the refusals do not eat the service's
    capacity; a float is its ``k`` (1.1 by default), an :class:`AdaptiveThrottle` may be shared by
    several clients, None turns it off.
    TLS: ``tls_ca`` (PEM path) verifies the server; ``tls_cert`` + ``tls_key`` add a client
    certificate (mTLS). ``api_key`` goes as the ``x-api-key`` metadata of every call.
    """

    _open_channel: Callable[[ChannelConfig], Any]

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        tls_server_name: str | None = None,
        api_key: str | None = None,
        retries: int | RetryPolicy = 2,
        rng: random.Random | None = None,
        throttle: AdaptiveThrottle | float | None = DEFAULT_K,
    ) -> None:
        self.timeout_s = _timeout(timeout_s)
        self.retry_policy = _policy(retries)
        self._config = ChannelConfig(target, tls_ca, tls_cert, tls_key, tls_server_name, api_key)
        self._rng = rng
        self.throttle = throttle_of(throttle)
        self._channel = type(self)._open_channel(self._config)
        self._stub = scoring_pb2_grpc.FraudScoringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _attempts(self, timeout_s: float | None) -> Attempts:
        """The attempts of one call: its overall deadline, the retry rule, the throttle."""
        timeout = _timeout(timeout_s if timeout_s is not None else self.timeout_s)
        return Attempts(timeout, self.retry_policy, self.throttle, self._config, self._rng)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._config!r}, timeout_s={self.timeout_s}, "
                f"retries={self.retry_policy.max_attempts - 1})")
