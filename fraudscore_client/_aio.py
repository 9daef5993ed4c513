"""``AsyncFraudScoreClient``: the asyncio twin of ``FraudScoreClient`` (grpc.aio, the same retry rule)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fraudscore_client._attempts import Attempts
from fraudscore_client._channel import ChannelConfig, PathLike, open_aio_channel
from fraudscore_client._messages import ScoreResult, Transaction, from_response, to_request
from fraudscore_client._retry import RetryPolicy
from fraudscore_client._sync import DEFAULT_TIMEOUT_S, _policy, _timeout
from fraudscore_client._throttle import DEFAULT_K, AdaptiveThrottle, throttle_of
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc


class AsyncFraudScoreClient:
    """As :class:`FraudScoreClient`, with ``async`` methods; create it inside the running event loop."""

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
        self._channel = open_aio_channel(self._config)
        self._stub = scoring_pb2_grpc.FraudScoringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def score(
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
        tx = Transaction(customer_id, terminal_id, amount, transaction_id, currency, timestamp, attributes or {})
        return from_response(await self._call(self._stub.Score, to_request(tx, request_id), timeout_s))

    async def score_batch(self, transactions: Sequence[Transaction], *, timeout_s: float | None = None) -> list[ScoreResult]:
        request = scoring_pb2.ScoreBatchRequest(requests=[to_request(tx) for tx in transactions])
        resp = await self._call(self._stub.ScoreBatch, request, timeout_s)
        return [from_response(r) for r in resp.responses]

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        resp = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        attempts = Attempts(_timeout(timeout_s if timeout_s is not None else self.timeout_s), self.retry_policy,
                            self.throttle, self._config, self._rng)
        while True:
            remaining, metadata = attempts.next()
            try:
                answer = await method(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                delay = attempts.failed(exc)
            else:
                attempts.answered()
                return answer
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFraudScoreClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
