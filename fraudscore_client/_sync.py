"""``FraudScoreClient``: the blocking client (one channel, safe retries inside one overall deadline)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from fraudscore_client._base import DEFAULT_TIMEOUT_S, ClientBase
from fraudscore_client._channel import open_channel
from fraudscore_client._messages import ScoreResult, Transaction, from_response, to_request
from scoring_service.protos import scoring_pb2

T = TypeVar("T")


class FraudScoreClient(ClientBase):
    """The blocking client of ``fraudscore.v1.FraudScoring``. Thread-safe; keep one per process and
    close it. Its arguments: :class:`ClientBase` (``timeout_s``, ``retries``, ``throttle``, TLS, key)."""

    _open_channel = staticmethod(open_channel)

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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FraudScoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


__all__ = ["DEFAULT_TIMEOUT_S", "FraudScoreClient"]
