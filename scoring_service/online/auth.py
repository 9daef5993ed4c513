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
   metadata ``grpc-retry-pushback-ms`` (when the bucket has enough tokens again). A ScoreBatch of
   more payments than the key's burst could never be admitted by the bucket: ``INVALID_ARGUMENT``
   naming the burst, at once: letting the bucket go into debt instead would score the whole batch
   at once, past the burst the operator set. (When such a batch cost only its burst, a key limited
   to 50/s had 10,000 payments scored in 10.5 s.)

**Failed authentication is limited per address** (``FailureBudget``). A key the process has not
seen costs a thread hop and a SQL query to look up; before this budget, 650 calls a second with
random keys from one client took a good key's p50/p99 from 4.2/11.3 ms to 217/364 ms. Every call
that fails (no key, an unknown or revoked key, an unregistered certificate) spends one failure of
its address' bucket (IPv4 address, IPv6 /64), in this process; a lookup of a key not known good is
paid for before it is made (and given back when the key is good), so an address never has more
lookups in flight than its bucket holds. Past the budget, a call from that address whose key this
process has not found good is refused before any lookup, ``RESOURCE_EXHAUSTED`` with the pushback
(its key was not checked, so ``UNAUTHENTICATED`` would be a claim about it; reason
``failure_budget``). Keys found good stay known past ``ttl_s`` (their revalidation is never
refused), so the good callers behind a shared address (a NAT, a sidecar proxy) keep scoring while
another caller there floods wrong keys; a brand-new key from such an address waits for the flood
to stop. Recent failures are kept ``ttl_s`` (a negative cache): a repeated wrong key costs one HMAC
and a dict lookup, no thread hop. The refusal past the budget is made by admission control, before
the call is decoded or seen by any other interceptor, without an exception (``precheck``): at
650 wrong keys a second it cost ~0.9 ms of server CPU per call through the whole chain.

The caller reaches the handler through ``current_caller()`` (a context variable), which the admin
RPC records in the audit log.

Length: over 350 lines because the interceptor, its precheck and the two budgets it keeps (the
failures per address, the lookups in memory) share the same state; apart, each would reach into
the other's.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn
from urllib.parse import unquote

import grpc
from prometheus_client import Counter

from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.sql.keys import KeyStore, Principal
from scoring_service.logging import get_logger
from scoring_service.online.admission import PUSHBACK_KEY, Refusal
from scoring_service.online.tls import peer_names

log = get_logger(__name__)

API_KEY_HEADER = "x-api-key"
REFUSED = Counter("fraudscore_auth_refused_total", "Calls refused by authentication, scope or rate limit.", ["reason"])
LOOKUPS = Counter("fraudscore_auth_lookups_total", "Key and mTLS lookups in the key table (a thread hop and a SQL "
                  "query each), by result.", ["result"])
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("fraudscore_caller", default=None)
_MAX_CACHED = 10_000
# Failed authentications per address and process: a misconfigured client's burst of errors fits in 20;
# 10 lookups a second of keys nobody has are a negligible cost.
FAILED_AUTH_PER_S = 10.0
FAILED_AUTH_BURST = 20


def current_caller() -> Principal | None:
    """The authenticated caller of the call being served (None when authentication is off)."""
    return _CALLER.get()


def peer_address(peer: str) -> str:
    """The address a call came from, without its port: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``. An
    IPv6 address stands for its /64 (one host may use the whole prefix), an IPv4-mapped one for its
    IPv4 address; anything else (``unix:...``) is taken whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = unquote(rest).rpartition(":")[0].strip("[]")  # grpc writes ipv6:%5B::1%5D:port
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return peer
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return peer


class PeerLimited(Exception):
    """The caller's address is past its budget of failed authentications; its key was not looked at."""

    def __init__(self, address: str, retry_after_ms: int) -> None:
        super().__init__(address)
        self.address = address
        self.retry_after_ms = retry_after_ms


class FailureBudget:
    """Failed authentications allowed per address: a token bucket each, in this process.

    In the process and not in Redis: a failure must cost less than the lookup it saves, and N
    processes allow N times the budget (each refuses past its own). Bounded: past ``max_peers``
    addresses the oldest bucket is forgotten (a full one again)."""

    def __init__(self, rate_per_s: float = FAILED_AUTH_PER_S, burst: int = FAILED_AUTH_BURST,
                 max_peers: int = 10_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: dict[str, list[float]] = {}  # address -> [tokens, when last refilled]

    def take(self, address: str) -> None:
        """Spend one failure of ``address``; PeerLimited when it has none left."""
        now = time.monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_peers:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[address] = [float(self.burst), now]
        tokens = self._refilled(bucket, now)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise PeerLimited(address, self._wait_ms(tokens))
        bucket[0] = tokens - 1.0

    def exhausted(self, address: str) -> int | None:
        """How long until ``address`` has a failure to spend again (ms), or None when it has one now;
        nothing is spent."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        tokens = self._refilled(bucket, time.monotonic())
        return None if tokens >= 1.0 else self._wait_ms(tokens)

    def _refilled(self, bucket: list[float], now: float) -> float:
        """The bucket's failures at ``now``: what it held, refilled since, at most the burst."""
        return min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate_per_s)

    def _wait_ms(self, tokens: float) -> int:
        """How long until a bucket holding ``tokens`` (< 1) has one failure to spend."""
        return math.ceil((1.0 - tokens) * 1000 / self.rate_per_s)

    def give_back(self, address: str) -> None:
        """Return the failure taken for a lookup that found a good key."""
        bucket = self._buckets.get(address)
        if bucket is not None:
            bucket[0] = min(float(self.burst), bucket[0] + 1.0)

    def message(self, limited: PeerLimited) -> str:
        return (f"too many failed authentications from {limited.address} (at most {self.burst}, then "
                f"{self.rate_per_s:g}/s); this call's credentials were not checked; retry after "
                f"{limited.retry_after_ms} ms")


class Authenticator:
    """Key and mTLS lookups through ``store``, each kept ``ttl_s`` seconds in this process, and the
    failures per address (``failures``); see the module docstring.

    ``_found``: principals found (revoked ones too) with when to look them up again; an entry past
    its time still says the key was good, so its revalidation is never refused for the address'
    failures. ``_failed``: keys (by hash) and certificate names found in no row, until when."""

    def __init__(self, store: KeyStore, ttl_s: float = 5.0, failures: FailureBudget | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.failures = failures or FailureBudget()
        self._found: dict[object, tuple[Principal, float]] = {}
        self._failed: dict[object, float] = {}

    async def _lookup(self, key: object, lookup: Callable[[], Principal | None],
                      peer: Callable[[], str]) -> Principal | None:
        """The principal of ``key`` (None: none), from this process' memory when fresh; a failure is
        charged to the caller's address (PeerLimited past its budget)."""
        now = time.monotonic()
        found = self._found.get(key)
        if found is not None and found[1] > now:
            if found[0].revoked_at is not None:
                self.failures.take(peer_address(peer()))
            return found[0]  # the hot path: a known key, one dict lookup
        if found is None and self._failed.get(key, 0.0) > now:
            self.failures.take(peer_address(peer()))  # a repeated wrong key: no lookup, no thread hop
            return None
        known = found is not None and found[0].revoked_at is None
        address = peer_address(peer())
        if not known:  # paid before the lookup: an address never has more lookups in flight than its budget
            self.failures.take(address)
        try:
            principal = await asyncio.to_thread(lookup)
        except BaseException:
            if not known:
                self.failures.give_back(address)  # the table unreachable is not the caller's failure
            raise
        now = time.monotonic()
        LOOKUPS.labels("unknown" if principal is None else "revoked" if principal.revoked_at else "found").inc()
        if principal is None:
            self._found.pop(key, None)
            if len(self._failed) >= _MAX_CACHED:
                del self._failed[next(iter(self._failed))]  # the oldest failure
            self._failed[key] = now + self.ttl_s
        else:
            if len(self._found) >= _MAX_CACHED:
                self._found.clear()  # only keys in the table get here: as many as there are keys
            self._found[key] = (principal, now + self.ttl_s)
            self._failed.pop(key, None)
        good = principal is not None and principal.revoked_at is None
        if good and not known:
            self.failures.give_back(address)
        elif not good and known:
            try:
                self.failures.take(address)
            except PeerLimited:
                pass  # refused as unknown or revoked anyway
        return principal

    def found_good(self, secret: str | None, names: Callable[[], list[str]]) -> bool:
        """Whether this process has found the caller's key (or, without one, its certificate's
        names) good, fresh or not: what lets a caller through while its address is past its budget."""
        key: object = ("key", self.store.hashes(secret)[0]) if secret is not None else ("mtls", tuple(names()))
        found = self._found.get(key)
        return found is not None and found[0].revoked_at is None

    async def by_key(self, secret: str, peer: Callable[[], str]) -> Principal | None:
        """The key's principal (None: unknown); ``peer`` gives the call's peer (grpc's ``context.peer``)."""
        digest = self.store.hashes(secret)[0]  # the cache is keyed by the hash, never by the key
        return await self._lookup(("key", digest), lambda: self.store.by_secret(secret), peer)

    async def by_mtls(self, names: list[str], peer: Callable[[], str]) -> Principal | None:
        return await self._lookup(("mtls", tuple(names)), lambda: self.store.by_mtls(names), peer)

    def failed(self, peer: Callable[[], str]) -> None:
        """Charge a call that failed without a lookup (no credentials) to its address."""
        self.failures.take(peer_address(peer()))


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
            cost = len(getattr(request, "requests", ())) or 1  # a ScoreBatch: its payments
            rate = caller.rate_per_s or self.default_rate
            burst = caller.burst or self.default_burst
            if cost > burst:  # the bucket never holds that many: no wait would let it through
                await self._refuse(context, "batch_over_burst", grpc.StatusCode.INVALID_ARGUMENT,
                                   f"a ScoreBatch of {cost} payments is more than the key's burst of {burst} "
                                   f"(rate limit {rate:g}/s): send at most {burst} payments per call", caller)
            verdict = await self.limiter.take(caller.key_id, rate, burst, cost)
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

    def precheck(self, context: grpc.aio.ServicerContext) -> Refusal | None:
        """Run by admission control before the request is decoded or any other interceptor sees
        it: a call from an address past its failed-authentication budget whose credentials this
        process has not found good is refused there (``failure_budget``), with the pushback and no
        exception; the same refusal ``_caller`` would make, at a fraction of its cost."""
        address = peer_address(context.peer())
        retry_after_ms = self.auth.failures.exhausted(address)
        if retry_after_ms is None:
            return None
        secret = next((v for k, v in context.invocation_metadata() or () if k == API_KEY_HEADER), None)
        if isinstance(secret, bytes):
            secret = secret.decode(errors="replace")
        if self.auth.found_good(secret, lambda: peer_names(context)):
            return None
        REFUSED.labels("failure_budget").inc()
        self._log_refusal("failure_budget", None, address)
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       self.auth.failures.message(PeerLimited(address, retry_after_ms)),
                       ((PUSHBACK_KEY, str(retry_after_ms)),))

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        secret = next((v for k, v in context.invocation_metadata() or () if k == API_KEY_HEADER), None)
        try:
            if secret is not None:
                caller = await self.auth.by_key(secret if isinstance(secret, str) else secret.decode(errors="replace"),
                                                context.peer)
                missing = "unknown API key"
            else:
                names = peer_names(context)
                caller = await self.auth.by_mtls(names, context.peer) if names else None
                missing = (f"no API key ({API_KEY_HEADER} metadata)" if not names
                           else f"the client certificate {names[0]!r} is not registered (fraudscore keys create --mtls)")
                if not names:
                    self.auth.failed(context.peer)
        except PeerLimited as limited:
            context.set_trailing_metadata(((PUSHBACK_KEY, str(limited.retry_after_ms)),))
            await self._refuse(context, "failure_budget", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               self.auth.failures.message(limited), peer=limited.address)
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
                      caller: Principal | None = None, peer: str | None = None) -> NoReturn:
        REFUSED.labels(reason).inc()
        self._log_refusal(reason, caller, peer)
        await context.abort(code, message)
        raise AssertionError("context.abort raises")  # for the type checker: abort never returns


    def _log_refusal(self, reason: str, caller: Principal | None, peer: str | None) -> None:
        now = time.monotonic()
        if now - self._last_log.get(reason, 0.0) >= 1.0:  # at most a line a second per reason
            self._last_log[reason] = now
            log.warning("auth.refused", reason=reason, key_id=caller.key_id if caller else None, pid=os.getpid(),
                        **({"peer": peer} if peer else {}))


class Security:
    """What the server process puts in front of its services: TLS credentials (None: plaintext) and
    the auth interceptor (None: authentication off)."""

    def __init__(self, interceptor: AuthInterceptor | None = None, credentials: grpc.ServerCredentials | None = None) -> None:
        self.interceptor = interceptor
        self.credentials = credentials

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.interceptor] if self.interceptor is not None else []

    def prechecks(self) -> list[Callable[[grpc.aio.ServicerContext], Refusal | None]]:
        """What admission control checks before decoding a call (AuthInterceptor.precheck)."""
        return [self.interceptor.precheck] if self.interceptor is not None else []

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on ``address`` with TLS when configured; the port (0 when it cannot)."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)

    async def close(self) -> None:
        if self.interceptor is not None:
            await self.interceptor.limiter.close()
