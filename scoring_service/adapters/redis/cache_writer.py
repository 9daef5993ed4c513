"""Bulk writes of one cache generation, and the atomic switch to it.

Keys follow ``scoring_service.core.cache_layout``. A generation is written in chunks of pipelined
``SET key value EX ttl`` commands, encoded to RESP here (redis-py's per-command packing is the
bottleneck at these rates) and sent over several connections from a thread pool; every reply is
checked. Only when every key of the generation is acknowledged does :func:`switch_generation`
point ``fs:1:<model>:active`` at it with one ``SET``: readers see the old generation or the new
one, never a mix. If anything fails, nothing is switched and the previous generation keeps
serving; the half-written one expires with its TTL (or is removed by :func:`delete_generation`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from scoring_service.core.cache_layout import (
    CUSTOMER,
    TERMINAL,
    CacheEntry,
    active_generation_key,
    entity_key,
    generation_pattern,
)
from scoring_service.logging import get_logger

log = get_logger(__name__)


class CacheWriteError(RuntimeError):
    pass


@dataclass
class WriteStats:
    keys: int
    seconds: float

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else float("inf")


def _resp(parts: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def encode_set_chunk(items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> bytes:
    ttl = str(int(ttl_s)).encode()
    tl = len(ttl)
    buf = []
    for k, v in items:
        buf.append(b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v, tl, ttl))
    return b"".join(buf)


class _Conn:
    """One raw connection (auth/db via redis-py's handshake), for pipelined bulk SETs."""

    def __init__(self, url: str, timeout: float) -> None:
        self._pool = redis.ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._conn = self._pool.get_connection()

    def set_chunk(self, payload: bytes, n: int) -> None:
        conn = self._conn
        conn.send_packed_command([payload], check_health=False)
        sock = conn._sock  # noqa: SLF001 - raw replies: n times b"+OK\r\n"
        lines = 0
        got = bytearray()
        while lines < n:  # one reply line per command: +OK, or -ERR ... on failure
            data = sock.recv(1 << 20)
            if not data:
                raise CacheWriteError("Redis closed the connection during a bulk write")
            lines += bytes(got[-1:] + data).count(b"\r\n")
            got += data
        if len(got) != 5 * n or got.count(b"+OK\r\n") != n:
            self.close()
            bad = next((line for line in bytes(got).split(b"\r\n") if line and line != b"+OK"), b"?")
            raise CacheWriteError(f"Redis refused a bulk write: {bad[:200].decode(errors='replace')}")

    def close(self) -> None:
        try:
            self._conn.disconnect()
        finally:
            self._pool.disconnect()


def entry_items(model_version: str, generation: str, customers: dict[str, CacheEntry],
                terminals: dict[str, CacheEntry]) -> list[tuple[bytes, bytes]]:
    items = [(entity_key(model_version, generation, CUSTOMER, cid).encode(), e.encode()) for cid, e in customers.items()]
    items += [(entity_key(model_version, generation, TERMINAL, tid).encode(), e.encode()) for tid, e in terminals.items()]
    return items


def write_items(url: str, items: Sequence[tuple[bytes, bytes]], ttl_s: int, *, connections: int = 4,
                chunk: int = 5000, timeout: float = 30.0, progress: Callable[[int], None] | None = None,
                after_chunk: Callable[[int], None] | None = None) -> WriteStats:
    """SET every (key, value) with EX ttl; raises :class:`CacheWriteError` unless all succeed."""
    started = time.perf_counter()
    if not items:
        return WriteStats(0, 0.0)
    chunks = [items[i: i + chunk] for i in range(0, len(items), chunk)]
    local = threading.local()
    conns: list[_Conn] = []
    lock = threading.Lock()
    written = [0]

    def work(ch: Sequence[tuple[bytes, bytes]]) -> int:
        c = getattr(local, "conn", None)
        if c is None:
            try:
                c = local.conn = _Conn(url, timeout)
            except redis.RedisError as exc:
                raise CacheWriteError(f"cannot connect to Redis: {exc}") from None
            with lock:
                conns.append(c)
        try:
            c.set_chunk(encode_set_chunk(ch, ttl_s), len(ch))
        except OSError as exc:
            raise CacheWriteError(f"Redis write failed: {exc}") from None
        with lock:
            written[0] += len(ch)
            done = written[0]
        if progress:
            progress(len(ch))
        if after_chunk:
            after_chunk(done)
        return len(ch)

    try:
        with ThreadPoolExecutor(max_workers=max(1, connections), thread_name_prefix="cache-writer") as pool:
            total = sum(pool.map(work, chunks))
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
    return WriteStats(total, time.perf_counter() - started)


def write_generation(url: str, model_version: str, generation: str, customers: dict[str, CacheEntry],
                     terminals: dict[str, CacheEntry], ttl_s: int, **kwargs: object) -> WriteStats:
    """Write every entry of a generation (not yet active)."""
    items = entry_items(model_version, generation, customers, terminals)
    return write_items(url, items, ttl_s, **kwargs)  # type: ignore[arg-type]


def active_generation(url: str, model_version: str) -> str | None:
    raw = redis.Redis.from_url(url, socket_timeout=5).get(active_generation_key(model_version))
    return raw.decode() if raw is not None else None


def switch_generation(url: str, model_version: str, generation: str, expected_keys: int | None = None,
                      sample: Iterable[bytes] = ()) -> str | None:
    """Point the model's active generation at ``generation`` (one SET); returns the previous one.

    ``sample``: keys that must exist first (a cheap check that the writes really landed).
    """
    r = redis.Redis.from_url(url, socket_timeout=10)
    keys = list(sample)
    if keys:
        present = r.exists(*keys)
        if present != len(keys):
            raise CacheWriteError(f"only {present} of {len(keys)} sampled keys of generation {generation} exist: not switching")
    key = active_generation_key(model_version)
    previous = r.set(key, generation, get=True)
    return previous.decode() if previous is not None else None


def delete_generation(url: str, model_version: str, generation: str, batch: int = 5000) -> int:
    """Remove a generation's entries (a failed run's leftovers); never the active pointer."""
    r = redis.Redis.from_url(url, socket_timeout=30)
    n = 0
    pending: list[bytes] = []
    for k in r.scan_iter(match=generation_pattern(model_version, generation), count=batch):
        pending.append(k)
        if len(pending) >= batch:
            n += r.unlink(*pending)
            pending.clear()
    if pending:
        n += r.unlink(*pending)
    return n
