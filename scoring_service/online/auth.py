"""Who may call: API keys (or mTLS identities) with scopes, and a rate limit per key.

One interceptor in front of the protected services (``scopes``: method prefix -> scope needed);
health and reflection are not in it and stay open for probes. For each protected call:

1. The caller: the ``x-api-key`` metadata, hashed (HMAC-SHA256 with the pepper) and looked up in
   the ``api_keys`` table; without a key, a verified client certificate's CN/SANs looked up among
   the rows of kind ``mtls``. Lookups are kept ``ttl_s`` seconds in the process (a dict, bounded),
   so the hot path costs one HMAC and a dict lookup, not a SQL query per call: a revoked key is
   refused within ``ttl_s`` (default 5 s) on every worker. No key, an unknown or a revoked one:
   ``UNAUTHENTICATED``. The database down: ``UNAVAILABLE`` for callers not cached (never let in).
2. The scope: a key without it gets ``PERMISSION_DENIED``.
3. The rate: the key's token bucket (``adapters/redis/rate_limit.py``, shared through Redis; a
   ScoreBatch takes one token per payment); empty: ``RESOURCE_EXHAUSTED`` with the trailing
   metadata ``grpc-retry-pushback-ms`` (when the bucket has enough tokens again).

The caller reaches the handler through ``current_caller()`` (a context variable), which the admin
RPC records in the audit log.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from prometheus_client import Counter

from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.sql.keys import KeyStore, Principal
from scoring_service.logging import get_logger
from scoring_service.online.admission import PUSHBACK_KEY
from scoring_service.online.tls import peer_names

log = get_logger(__name__)

API_KEY_HEADER = "x-api-key"
REFUSED = Counter("fraudscore_auth_refused_total", "Calls refused by authentication, scope or rate limit.", ["reason"])
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("fraudscore_caller", default=None)
_MAX_CACHED = 10_000


def current_caller() -> Principal | None:
    """The authenticated caller of the call being served (None when authentication is off)."""
    return _CALLER.get()


class Authenticator:
    """Key and mTLS lookups through ``store``, each kept ``ttl_s`` seconds in this process."""

    def __init__(self, store: KeyStore, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[object, tuple[Principal | None, float]] = {}

    async def _cached(self, key: object, lookup: Callable[[], Principal | None]) -> Principal | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await asyncio.to_thread(lookup)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (principal, now + self.ttl_s)
        return principal

    async def by_key(self, secret: str) -> Principal | None:
        digest = self.store.hashes(secret)[0]  # the cache is keyed by the hash, never by the key
        return await self._cached(("key", digest), lambda: self.store.by_secret(secret))

    async def by_mtls(self, names: list[str]) -> Principal | None:
        return await self._cached(("mtls", tuple(names)), lambda: self.store.by_mtls(names))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, checks the scope and rate-limits the methods under ``scopes``; see the module docstring."""

    def __init__(self, auth: Authenticator, limiter: RateLimiter, scopes: dict[str, str], *,
                 default_rate: float, default_burst: int) -> None:
        self.auth = auth
        self.limiter = limiter
        self.scopes = scopes
        self.default_rate = default_rate
        self.default_burst = default_burst
        self._last_log: dict[str, float] = {}

    def _scope(self, method: str) -> str | None:
        for prefix, scope in self.scopes.items():
            if method.startswith(prefix):
                return scope
        return None

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        scope = self._scope(handler_call_details.method)
        if handler is None or scope is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await self._caller(context)
            if scope not in caller.scopes:
                await self._refuse(context, "scope", grpc.StatusCode.PERMISSION_DENIED,
                                   f"the caller {caller.kind}:{caller.key_id} lacks the scope {scope!r}", caller)
            cost = len(getattr(request, "requests", ())) or 1
            rate = caller.rate_per_s or self.default_rate
            burst = caller.burst or self.default_burst
            verdict = await self.limiter.take(caller.key_id, rate, burst, min(cost, burst))
            if not verdict.allowed:
                context.set_trailing_metadata(((PUSHBACK_KEY, str(verdict.retry_after_ms)),))
                await self._refuse(context, "rate", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"rate limit of {rate:g}/s (burst {burst}) reached; retry after "
                                   f"{verdict.retry_after_ms} ms", caller)
            token = _CALLER.set(caller)
            try:
                return await inner(request, context)
            finally:
                _CALLER.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            authenticated, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        secret = next((v for k, v in context.invocation_metadata() or () if k == API_KEY_HEADER), None)
        try:
            if secret is not None:
                caller = await self.auth.by_key(secret if isinstance(secret, str) else secret.decode(errors="replace"))
                missing = "unknown API key"
            else:
                names = peer_names(context)
                caller = await self.auth.by_mtls(names) if names else None
                missing = (f"no API key ({API_KEY_HEADER} metadata)" if not names
                           else f"the client certificate {names[0]!r} is not registered (fraudscore keys create --mtls)")
        except Exception as exc:  # the key table unreachable: nobody new gets in
            log.error("auth.lookup_failed", error=str(exc))
            await self._refuse(context, "lookup", grpc.StatusCode.UNAVAILABLE, "cannot check the caller's key now")
        if caller is None:
            await self._refuse(context, "unknown", grpc.StatusCode.UNAUTHENTICATED, missing)
        if caller.revoked_at is not None:
            await self._refuse(context, "revoked", grpc.StatusCode.UNAUTHENTICATED,
                               f"API key {caller.key_id} was revoked", caller)
        return caller

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode, message: str,
                      caller: Principal | None = None) -> NoReturn:
        REFUSED.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log.get(reason, 0.0) >= 1.0:  # at most a line a second per reason
            self._last_log[reason] = now
            log.warning("auth.refused", reason=reason, key_id=caller.key_id if caller else None, pid=os.getpid())
        await context.abort(code, message)
        raise AssertionError("context.abort raises")  # for the type checker: abort never returns


class Security:
    """What the server process puts in front of its services: TLS credentials (None: plaintext) and
    the auth interceptor (None: authentication off)."""

    def __init__(self, interceptor: AuthInterceptor | None = None, credentials: grpc.ServerCredentials | None = None) -> None:
        self.interceptor = interceptor
        self.credentials = credentials

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.interceptor] if self.interceptor is not None else []

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on ``address`` with TLS when configured; the port (0 when it cannot)."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)

    async def close(self) -> None:
        if self.interceptor is not None:
            await self.interceptor.limiter.close()
