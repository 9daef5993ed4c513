"""The one exception the client raises for a call that did not give an answer."""

from __future__ import annotations

import grpc


class ScoringError(Exception):
    """A call that failed: the gRPC status ``code``, the server's ``details`` and how many attempts were made.

    ``code`` is a :class:`grpc.StatusCode`: ``INVALID_ARGUMENT`` (the details name the field),
    ``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` (the API key or the client certificate),
    ``RESOURCE_EXHAUSTED`` (overload, still refused after the retries the deadline allowed),
    ``UNAVAILABLE`` (no connection), ``DEADLINE_EXCEEDED`` (the overall deadline ran out)...
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, attempts: int = 1) -> None:
        self.code = code
        self.details = details
        self.attempts = attempts
        super().__init__(f"{code.name}: {details}")

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"INVALID_ARGUMENT"``."""
        return str(self.code.name)

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError, *, attempts: int) -> ScoringError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", attempts=attempts)
