"""``AsyncFraudScoreClient``: the asyncio twin of ``FraudScoreClient`` (grpc.aio, the same retry rule)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fraudscore_client._base import ClientBase
from fraudscore_client._channel import open_aio_channel
from fraudscore_client._messages import ScoreResult, Transaction, from_response, to_request
from scoring_service.protos import scoring_pb2


class AsyncFraudScoreClient(ClientBase):
    """As :class:`FraudScoreClient`, with ``async`` methods; create it inside the running event loop."""

    _open_channel = staticmethod(open_aio_channel)

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
        attempts = self._attempts(timeout_s)
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
