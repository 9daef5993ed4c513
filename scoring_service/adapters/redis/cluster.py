"""A Redis Cluster client for the request path: one :class:`~resp.PipelinedRedis` per node.

``ClusterRedis`` has the interface of ``PipelinedRedis`` (``execute``, ``execute_many``,
``aclose``): every command must touch keys of one hash slot (its first key routes it: ``args[1]``,
or the first of ``KEYS`` for EVAL/EVALSHA, so the rate limiter's script can run here too).
``execute_many`` groups a pipeline's commands by the node that owns their slots and sends one
pipeline per node, all at once: a request that reads keys on three nodes still waits one
round trip. Replies come back in the order of the commands; a command's order relative to the
others of its node (hence of its key) is kept.

The slot map comes from ``CLUSTER SLOTS`` (asked of the seed URL's node first, then of any known
node), on first use and again after a ``MOVED`` or a lost connection. A ``MOVED`` reply is
followed (the command is sent again to the node it names, and that slot is remapped at once); an
``ASK`` reply is followed for that command only (``ASKING`` + the command, on the named node),
as a slot migration requires. At most :data:`MAX_REDIRECTS` hops per command, then the
redirection comes back as the command's error.

Every node connection is made from the seed URL with only the host and port changed, so AUTH
(``redis://user:password@...``) and TLS (``rediss://...?ssl_ca_certs=...``) are those of
``resp.PipelinedRedis``. A cluster has only database 0.
"""

from __future__ import annotations

import asyncio
from binascii import crc_hqx
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlparse

from scoring_service.adapters.redis.protocol import Arg
from scoring_service.adapters.redis.resp import PipelinedRedis, RedisReplyError

__all__ = ["MAX_REDIRECTS", "SLOTS", "ClusterRedis", "key_slot", "node_url", "parse_slots"]

SLOTS = 16384
MAX_REDIRECTS = 3
_Addr = tuple[str, int]


def key_slot(key: bytes | str) -> int:
    """The hash slot of ``key`` (CRC16/XModem of the key, or of its ``{hash tag}``, mod 16384)."""
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1: end]
    return crc_hqx(k, 0) % SLOTS


def _as_key(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return (arg if isinstance(arg, str) else str(arg)).encode()


def _route_key(command: Sequence[Arg]) -> bytes:
    """The key that routes ``command``: its first argument, or for EVAL/EVALSHA its first key."""
    name = _as_key(command[0]).upper() if command else b""
    if name in (b"EVAL", b"EVALSHA", b"FCALL") and len(command) > 3 and int(command[2]) > 0:
        return _as_key(command[3])
    if len(command) < 2 or name in (b"EVAL", b"EVALSHA", b"FCALL"):
        raise ValueError(f"{name.decode(errors='replace')!r}: a cluster command needs a key to route it")
    return _as_key(command[1])


def node_url(url: str, addr: _Addr) -> str:
    """The seed ``url`` with only its host and port replaced by ``addr`` (credentials, TLS and query kept)."""
    u = urlparse(url)
    userinfo = u.netloc.rpartition("@")[0]
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    netloc = f"{userinfo}@{host}:{addr[1]}" if userinfo else f"{host}:{addr[1]}"
    return u._replace(netloc=netloc, path="/0").geturl()


def parse_slots(reply: Sequence[Any], asked: _Addr) -> list[_Addr | None]:
    """The owner (primary) of every slot, from a ``CLUSTER SLOTS`` reply of the node at ``asked``."""
    slots: list[_Addr | None] = [None] * SLOTS
    for start, end, primary, *_replicas in reply:
        raw = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        host = asked[0] if raw in ("", "?") else raw  # "" or "?": the node we asked
        slots[int(start): int(end) + 1] = [(host, int(primary[1]))] * (int(end) - int(start) + 1)
    return slots


def _redirect(reply: object) -> tuple[str, int, _Addr] | None:
    """("MOVED" | "ASK", slot, (host, port)) of a redirection error, else None."""
    if not isinstance(reply, RedisReplyError):
        return None
    parts = str(reply).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], int(parts[1]), (host, int(port))


class ClusterRedis:
    """``await c.execute_many([("GET", k1), ("GET", k2), ("ZRANGE", k3, 0, -1)])`` across a Redis Cluster."""

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, stale_after_s: float = 1.0) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(f"REDIS_URL: a Redis Cluster is reached by redis:// or rediss://, not {u.scheme!r}")
        db = u.path.lstrip("/") or dict(parse_qsl(u.query)).get("db") or "0"
        if db != "0":
            raise ValueError(f"REDIS_URL: a Redis Cluster has only database 0 (the URL names {db})")
        self._url = url
        self._seed: _Addr = (u.hostname or "localhost", u.port or 6379)
        self._options = {"connect_timeout_s": connect_timeout_s, "stale_after_s": stale_after_s}
        PipelinedRedis(url, connect_timeout_s=connect_timeout_s)  # validates the URL (TLS files) now
        self._nodes: dict[_Addr, PipelinedRedis] = {}
        self._slots: list[_Addr | None] = [None] * SLOTS
        self._mapped = False
        self._refreshing: asyncio.Task[None] | None = None
        self.refreshes = 0  # slot map loads (for tests and metrics)
        self.redirects = {"MOVED": 0, "ASK": 0}  # redirections followed
        self._closed = False

    # ------------------------------------------------------------------ nodes and slots
    def node(self, addr: _Addr) -> PipelinedRedis:
        client = self._nodes.get(addr)
        if client is None:
            client = PipelinedRedis(node_url(self._url, addr), connect_timeout_s=self._options["connect_timeout_s"],
                                    stale_after_s=self._options["stale_after_s"])
            self._nodes[addr] = client
        return client

    def owner(self, key: bytes | str) -> _Addr | None:
        """The node serving ``key``'s slot, as far as the current slot map knows."""
        return self._slots[key_slot(key)]

    async def refresh_slots(self, timeout_s: float | None = None) -> None:
        """Load the slot map (``CLUSTER SLOTS``); concurrent callers share one load."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._load_slots(timeout_s))
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting callers re-raise it

    async def _load_slots(self, timeout_s: float | None) -> None:
        candidates = [self._seed, *(a for a in self._nodes if a != self._seed)]
        error: BaseException | None = None
        for addr in candidates:
            try:
                reply = await self.node(addr).execute("CLUSTER", "SLOTS", timeout_s=timeout_s)
            except (RedisReplyError, OSError, TimeoutError) as exc:
                error = exc
                continue
            self._slots, self._mapped = parse_slots(reply, addr), True
            self.refreshes += 1
            return
        raise ConnectionError(f"no node of the Redis Cluster answered CLUSTER SLOTS: {error}")

    def _stale(self, _exc: BaseException | None = None) -> None:
        self._mapped = False  # the next call reloads the map (a failover moves slots)

    # ------------------------------------------------------------------ commands
    async def execute(self, *args: Arg, timeout_s: float | None = None) -> Any:
        """One command's reply; a Redis error raises ``RedisReplyError``."""
        (reply,) = await self.execute_many([args], timeout_s=timeout_s)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Sequence[Arg]], timeout_s: float | None = None) -> list[Any]:
        """Replies of the commands, in order (Redis errors as ``RedisReplyError`` values); one pipeline
        per node, sent concurrently; MOVED/ASK followed."""
        if self._closed:
            raise ConnectionError("client closed")
        if not commands:
            return []
        if not self._mapped:
            await self.refresh_slots(timeout_s)
        replies: list[Any] = [None] * len(commands)
        routes: dict[_Addr, list[int]] = {}
        for i, command in enumerate(commands):
            addr = self.owner(_route_key(command)) or self._seed
            routes.setdefault(addr, []).append(i)
        await self._send(commands, routes, replies, timeout_s, asking=set())
        for _hop in range(MAX_REDIRECTS):
            moved: dict[_Addr, list[int]] = {}
            asked: set[int] = set()
            for i, reply in enumerate(replies):
                redirect = _redirect(reply)
                if redirect is None:
                    continue
                kind, slot, addr = redirect
                self.redirects[kind] += 1
                if kind == "MOVED":
                    self._slots[slot] = addr
                    self._stale()  # other slots probably moved too: reload the map on the next call
                else:
                    asked.add(i)
                moved.setdefault(addr, []).append(i)
            if not moved:
                break
            await self._send(commands, moved, replies, timeout_s, asking=asked)
        return replies

    async def _send(self, commands: Sequence[Sequence[Arg]], routes: dict[_Addr, list[int]], replies: list[Any],
                    timeout_s: float | None, *, asking: set[int]) -> None:
        """Send each node its commands (one pipeline per node, concurrently) and store the replies."""

        async def one(addr: _Addr, indices: list[int]) -> None:
            batch: list[Sequence[Arg]] = []
            for i in indices:
                if i in asking:
                    batch.append(("ASKING",))
                batch.append(commands[i])
            try:
                got = await self.node(addr).execute_many(batch, timeout_s=timeout_s)
            except (OSError, TimeoutError) as exc:
                self._stale(exc)
                raise
            it = iter(got)
            for i in indices:
                if i in asking:
                    next(it)  # ASKING's +OK
                replies[i] = next(it)

        await asyncio.gather(*(one(addr, idx) for addr, idx in routes.items()))

    async def ping(self, timeout_s: float) -> None:
        """Load the slot map and PING every primary (AUTH and TLS checked on each)."""
        await self.refresh_slots(timeout_s)
        primaries = {a for a in self._slots if a is not None}
        await asyncio.gather(*(self.node(a).ping(timeout_s) for a in primaries))

    async def aclose(self) -> None:
        self._closed = True
        nodes, self._nodes = list(self._nodes.values()), {}
        for client in nodes:
            await client.aclose()
