"""A small pipelining Redis client for the request path (RESP2 over one asyncio connection).

Every concurrent request shares one connection: commands issued during one turn of the event
loop leave in one ``send`` and their replies come back in order, parsed by hiredis. There is no
pool to take from and give back, no per-command lock, and no socket per in-flight request,
which is what a cache hit spent most of its Redis time on with ``redis.asyncio`` (see
bench/HISTORY.md). Only what the online cache needs is here: ``execute`` one command or
``execute_many`` in a pipeline; AUTH (``redis://user:password@...``) and SELECT from the URL on
every (re)connection; TCP, TLS (``rediss://``, with the query parameters redis-py takes:
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``) and
Unix sockets. Anything else uses redis-py. Commands are encoded by ``protocol`` (the package's one
RESP encoder, shared with the bulk writer).

Timeouts are ``timeout_s`` of ``execute`` / ``execute_many`` (they tolerate an event loop that
runs late, see ``_call``) or the caller's ``asyncio.timeout``: a reply whose waiter gave up is
read and dropped, so the connection stays in step. A broken connection fails every waiter with
``ConnectionError`` and the next command opens a new one. A connection whose oldest reply is
overdue by ``stale_after_s`` (a hung server, a black-holed route) is dropped the same way by the
next command, so that the circuit breaker's trial calls reach a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

import hiredis

from scoring_service.adapters.redis.protocol import Arg, pack, pack_many

__all__ = ["Arg", "PipelinedRedis", "RedisRefused", "RedisReplyError", "check_connection", "pack", "redact_url",
           "with_tls_files"]

# A waiter: (future, n, replies so far, sent at); n = 0 for one command, else a pipeline of n.
_Waiter = tuple[asyncio.Future[Any], int, list[Any], float]


class RedisReplyError(Exception):
    """Redis answered with an error (``-ERR ...``)."""


class RedisRefused(RedisReplyError, ConnectionError):
    """Redis (or its TLS layer) refused this client: wrong credentials, an untrusted certificate."""


def redact_url(url: str) -> str:
    """``url`` without its password (for logs and messages): ``redis://user:***@host:port/db``."""
    u = urlparse(url)
    if u.password is None:
        return url
    netloc = u.netloc.rsplit("@", 1)[1]
    user = f"{u.username}:" if u.username else ":"
    return u._replace(netloc=f"{user}***@{netloc}").geturl()


def with_tls_files(url: str, ca: str | None = None, cert: str | None = None, key: str | None = None) -> str:
    """``url`` with the TLS files as its query parameters (``rediss://`` only; those given in the URL win)."""
    u = urlparse(url)
    if u.scheme != "rediss":
        return url
    query = dict(parse_qsl(u.query))
    for name, value in (("ssl_ca_certs", ca), ("ssl_certfile", cert), ("ssl_keyfile", key)):
        if value and name not in query:
            query[name] = value
    return u._replace(query=urlencode(query)).geturl()


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(query: dict[str, str]) -> ssl.SSLContext:
    """The client TLS context of a ``rediss://`` URL's query (redis-py's parameter names)."""
    ctx = ssl.create_default_context(cafile=query.get("ssl_ca_certs") or None)
    if query.get("ssl_check_hostname", "").lower() in ("false", "0", "no"):
        ctx.check_hostname = False
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"REDIS_URL: ssl_cert_reqs={reqs!r}: expected none, optional or required")
    if _CERT_REQS[reqs] != ssl.CERT_REQUIRED:
        ctx.check_hostname = False
        ctx.verify_mode = _CERT_REQS[reqs]
    if query.get("ssl_certfile"):
        ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile") or None)
    return ctx


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.owner._waiters
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self.owner._broken(ConnectionError("unexpected reply from Redis"))
                return
            fut, n, acc, _ = waiters[0]
            if n:  # a pipeline of n commands: collect its n replies
                acc.append(reply)
                if len(acc) < n:
                    continue
                reply = acc
            waiters.popleft()
            if not fut.done():
                if not n and isinstance(reply, RedisReplyError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._broken(exc or ConnectionError("Redis closed the connection"))


class PipelinedRedis:
    """``await r.execute("MGET", k1, k2)``; ``await r.execute_many([("SET", k, v), ...])``."""

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, stale_after_s: float = 1.0) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"REDIS_URL: unsupported scheme {u.scheme!r} (redis://, rediss://, unix://)")
        self._unix_path = u.path if u.scheme == "unix" else None
        self._host = u.hostname or "localhost"
        self._port = u.port or 6379
        self._username = unquote(u.username) if u.username else None
        self._password = unquote(u.password) if u.password else None
        db = u.path.lstrip("/") if u.scheme != "unix" else ""
        query = dict(parse_qsl(u.query))
        self._db = int(query.get("db") or db or 0)
        try:
            self._ssl = tls_context(query) if u.scheme == "rediss" else None
        except (OSError, ssl.SSLError) as exc:  # a CA or client certificate that does not load
            raise ValueError(f"Redis TLS settings of {redact_url(url)}: {exc}") from None
        self._where = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.stale_after_s = stale_after_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiters: deque[_Waiter] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False

    # -------------------------------------------------------------- connection
    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            if self._unix_path:
                transport, proto = await loop.create_unix_connection(lambda: _Protocol(self), self._unix_path)
            else:
                transport, proto = await loop.create_connection(
                    lambda: _Protocol(self), self._host, self._port, ssl=self._ssl)
        sock = transport.get_extra_info("socket")
        if sock is not None and not self._unix_path:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._proto = proto
        hello: list[tuple[Arg, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        if hello:
            replies = await self._enqueue(pack_many(hello), len(hello))
            for r in replies:
                if isinstance(r, RedisReplyError):
                    self._broken(ConnectionError(f"Redis refused the connection set-up: {r}"))
                    raise RedisRefused(f"Redis at {self._where} refused the connection set-up: {r}")

    async def _ensure(self) -> None:
        if self._closed:
            raise ConnectionError("client closed")
        if self._proto is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future[None]) -> None:
        self._connecting = None
        if not fut.cancelled():
            fut.exception()  # retrieved here; the awaiting callers re-raise it

    def _broken(self, exc: BaseException) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        waiters, self._waiters = self._waiters, deque()
        self._out.clear()
        for fut, *_ in waiters:
            if not fut.done():
                fut.set_exception(ConnectionError(f"Redis connection lost: {exc}"))

    # -------------------------------------------------------------- commands
    def _enqueue(self, data: bytes, n: int) -> asyncio.Future[Any]:
        """Queue ``data`` for the next send; n = 0: one command, else a pipeline of n."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        if self._waiters and now - self._waiters[0][3] > self.stale_after_s:
            self._broken(TimeoutError(f"no reply from Redis for {now - self._waiters[0][3]:.1f}s"))
            fut.set_exception(ConnectionError("Redis connection dropped: replies overdue"))
            return fut
        self._waiters.append((fut, n, [], now))
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data, self._out = b"".join(self._out), []
        if self._proto is None or self._proto.transport is None:
            self._broken(ConnectionError("not connected"))
            return
        self._proto.transport.write(data)

    async def execute(self, *args: Arg, timeout_s: float | None = None) -> Any:
        """One command's reply (bytes, int, list, None); a Redis error raises ``RedisReplyError``."""
        return await self._call(pack(args), 0, timeout_s)

    async def execute_many(self, commands: Sequence[Sequence[Arg]], timeout_s: float | None = None) -> list[Any]:
        """Replies of a pipeline, in order; Redis errors come back as ``RedisReplyError`` values."""
        if not commands:
            return []
        return await self._call(pack_many(commands), len(commands), timeout_s)

    async def _call(self, data: bytes, n: int, timeout_s: float | None) -> Any:
        """Send ``data`` (n = 0: one command, else a pipeline of n) and wait for its reply.

        ``timeout_s`` bounds the wait, but never times out on a reply that is already here.
        ``asyncio.timeout`` measures wall time: when the event loop runs late (busy with other
        requests), the timer and the reply are due in the same turn, and uvloop runs timers
        before it reads sockets, so a reply Redis sent in 0.1 ms would count as a timeout. Here an
        expired timer waits two more turns of the loop, one poll of the socket included, before
        it raises ``TimeoutError``. A Redis that has not answered still fails within a turn of
        the deadline."""
        if timeout_s is None:
            if self._proto is None:
                await self._ensure()
            return await self._enqueue(data, n)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._proto is None:
            async with asyncio.timeout_at(deadline):
                await self._ensure()
        fut = self._enqueue(data, n)
        handles: list[asyncio.Handle] = []

        def expire(turns: int) -> None:
            if fut.done():
                return
            if turns:
                handles.append(loop.call_soon(expire, turns - 1))
            else:
                fut.set_exception(TimeoutError(f"no reply from Redis within {timeout_s * 1000:.1f} ms"))

        handles.append(loop.call_at(deadline, expire, 2))
        try:
            return await fut
        finally:
            for h in handles:
                h.cancel()

    async def ping(self, timeout_s: float) -> None:
        """Connect (TLS, AUTH, SELECT) and PING; RedisRefused if Redis or its TLS layer refuses us."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.execute("PING")
        except RedisRefused:
            raise
        except ssl.SSLError as exc:
            raise RedisRefused(f"Redis at {self._where}: TLS handshake failed: {exc.reason or exc}") from None
        except RedisReplyError as exc:
            raise RedisRefused(f"Redis at {self._where} refused PING: {exc}") from None

    async def aclose(self) -> None:
        self._closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


def check_connection(url: str, timeout_s: float = 3.0) -> None:
    """Connect to ``url`` as the service does and PING (blocking; not for the event loop's thread).

    Raises :class:`RedisRefused` (wrong password, unknown user, untrusted certificate: a
    configuration error), ``OSError``/``TimeoutError`` (unreachable: may come up later), or
    ``ValueError`` (an unusable URL). Messages name Redis by its URL without the password."""

    async def ping() -> None:
        client = PipelinedRedis(url, connect_timeout_s=timeout_s)
        try:
            await client.ping(timeout_s)
        finally:
            await client.aclose()

    asyncio.run(ping())
