"""``FraudScoreClient``: the blocking client (one channel, safe retries inside one overall deadline)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fraudscore_client._attempts import Attempts
from fraudscore_client._channel import ChannelConfig, PathLike, open_channel
from fraudscore_client._messages import ScoreResult, Transaction, from_response, to_request
from fraudscore_client._retry import RetryPolicy
from fraudscore_client._throttle import DEFAULT_K, AdaptiveThrottle, throttle_of
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 0.1


def _policy(retries: int | RetryPolicy) -> RetryPolicy:
    return retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_attempts=1 + retries)


def _timeout(value: float) -> float:
    if not value > 0:
        raise ValueError(f"timeout_s: must be > 0, got {value}")
    return value


class FraudScoreClient:
    """A client of ``fraudscore.v1.FraudScoring``. Thread-safe; keep one per process and close it.

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
        self._channel = open_channel(self._config)
        self._stub = scoring_pb2_grpc.FraudScoringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def score(
        self,
        customer_id: str,
        terminal_id: str,
        amount: float,
        *,
        transaction_id: str | None = None,
        currency: str = "",
        timestamp: datetime | None = None,
        attributes: dict[str, str] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ScoreResult:
        """Score one payment; raises :class:`ScoringError` when no answer came in time."""
        tx = Transaction(customer_id, terminal_id, amount, transaction_id, currency, timestamp, attributes or {})
        request = to_request(tx, request_id)
        return from_response(self._call(self._stub.Score, request, timeout_s))

    def score_batch(self, transactions: Sequence[Transaction], *, timeout_s: float | None = None) -> list[ScoreResult]:
        """Score several payments in one call (at most the service's ``FRAUDSCORE_MAX_BATCH_REQUEST``), in order."""
        request = scoring_pb2.ScoreBatchRequest(requests=[to_request(tx) for tx in transactions])
        resp = self._call(self._stub.ScoreBatch, request, timeout_s)
        return [from_response(r) for r in resp.responses]

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``..."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def _call(self, method: Callable[..., T], request: Any, timeout_s: float | None) -> T:
        attempts = self._attempts(timeout_s)
        while True:
            remaining, metadata = attempts.next()
            try:
                answer = method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                delay = attempts.failed(exc)
            else:
                attempts.answered()
                return answer
            time.sleep(delay)

    def _attempts(self, timeout_s: float | None) -> Attempts:
        timeout = _timeout(timeout_s if timeout_s is not None else self.timeout_s)
        return Attempts(timeout, self.retry_policy, self.throttle, self._config, self._rng)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FraudScoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FraudScoreClient({self._config!r}, timeout_s={self.timeout_s}, retries={self.retry_policy.max_attempts - 1})"


__all__ = ["DEFAULT_TIMEOUT_S", "FraudScoreClient"]
