"""Bulk writes of one cache generation, and the atomic switch to it.

Keys follow ``scoring_service.core.cache_layout``. A generation is written in chunks of pipelined
``SET key value EX ttl`` commands, encoded to RESP by ``protocol.pack_set_ex_many`` (redis-py's
per-command packing is the bottleneck at these rates) and sent over several connections from a
thread pool; every reply is checked. Only when every key of the generation is acknowledged does
:func:`switch_generation` point ``fs:1:<model>:active`` at it with one ``SET``: readers see the
old generation or the new one, never a mix. If anything fails, nothing is switched and the previous generation keeps
serving; the half-written one expires with its TTL (or is removed by :func:`delete_generation`).

:class:`RedisCacheWriter` (what the nightly and the replay write through) seals every entry with
the MAC keys (``core.cache_layout.seal``), as the online write-back does; the module functions
write what they are given. URLs may carry credentials and TLS settings
(``rediss://user:password@host:port/db?ssl_ca_certs=...``): redis-py reads them; errors name Redis
by its URL without the password.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from scoring_service.adapters.redis.protocol import pack_set_ex_many
from scoring_service.adapters.redis.resp import redact_url
from scoring_service.core.cache_layout import (
    CUSTOMER,
    TERMINAL,
    CacheEntry,
    active_generation_key,
    entity_key,
    entity_of_key,
    generation_pattern,
    manifest_key,
    seal,
)
from scoring_service.core.integrity import MacKeys
from scoring_service.core.known_entities import KnownEntities
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


def encode_set_chunk(items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> bytes:
    """One chunk of ``SET key value EX ttl_s`` in RESP (the encoder is ``protocol.pack_set_ex_many``)."""
    return pack_set_ex_many(items, ttl_s)


def _text(raw: object) -> str | None:
    """A string reply of redis-py (bytes: this module never sets ``decode_responses``) as str."""
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _Conn:
    """One raw connection (auth/db via redis-py's handshake), for pipelined bulk SETs."""

    def __init__(self, url: str, timeout: float) -> None:
        self._pool = redis.ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._conn = self._pool.get_connection()

    def set_chunk(self, payload: bytes, n: int) -> None:
        conn = self._conn
        conn.send_packed_command([payload], check_health=False)
        sock = conn._sock  # noqa: SLF001 - raw replies: n times b"+OK\r\n"
        if sock is None:  # send_packed_command connects first; None only if that failed silently
            raise CacheWriteError("Redis connection lost during a bulk write")
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
                raise CacheWriteError(f"cannot connect to Redis at {redact_url(url)}: {exc}") from None
            with lock:
                conns.append(c)
        try:
            c.set_chunk(pack_set_ex_many(ch, ttl_s), len(ch))
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
                     terminals: dict[str, CacheEntry], ttl_s: int, *, connections: int = 4, chunk: int = 5000,
                     timeout: float = 30.0, progress: Callable[[int], None] | None = None,
                     after_chunk: Callable[[int], None] | None = None) -> WriteStats:
    """Write every entry of a generation (not yet active); the keyword arguments are :func:`write_items`'s."""
    items = entry_items(model_version, generation, customers, terminals)
    return write_items(url, items, ttl_s, connections=connections, chunk=chunk, timeout=timeout, progress=progress,
                       after_chunk=after_chunk)


def active_generation(url: str, model_version: str) -> str | None:
    return _text(redis.Redis.from_url(url, socket_timeout=5).get(active_generation_key(model_version)))


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
    return _text(r.set(key, generation, get=True))


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


class RedisCacheWriter:
    """The batch jobs' cache writer: the functions above bound to one Redis, TTL, pool size and MAC keys.

    ``cluster=True``: the same through ``cluster_writer`` (a Redis Cluster; docs/redis-cluster.md).

    It remembers the entities of every key it wrote, per generation, and writes the generation's
    sealed manifest (``core.known_entities``: what the scorer holds against a deleted or evicted
    entry) just before switching to it: a generation is switched by the writer that wrote it."""

    def __init__(self, url: str, ttl_s: int, connections: int = 4, *, mac: MacKeys, cluster: bool = False) -> None:
        self.url, self.ttl_s, self.connections, self.mac = url, ttl_s, connections, mac
        self.cluster = cluster
        self._written: dict[str, list[tuple[str, str]]] = {}  # generation -> (kind, id) of every entry written

    def write_items(self, items: Sequence[tuple[bytes, bytes]], progress: Callable[[int], None] | None = None) -> WriteStats:
        """SET every (key, encoded entry), sealed with the signing MAC key."""
        for k, _ in items:
            entity = entity_of_key(k)
            if entity is not None:
                self._written.setdefault(k.split(b":", 4)[3].decode(), []).append(entity)
        sealed = [(k, seal(self.mac, k, v)) for k, v in items]
        if self.cluster:
            from scoring_service.adapters.redis import cluster_writer

            return cluster_writer.write_items(self.url, sealed, self.ttl_s, connections=self.connections,
                                              progress=progress)
        return write_items(self.url, sealed, self.ttl_s, connections=self.connections, progress=progress)

    def switch_generation(self, model_version: str, generation: str, sample: Sequence[bytes]) -> str | None:
        """Write the generation's sealed manifest, then point ``active`` at it (the previous generation)."""
        key = manifest_key(model_version, generation)
        manifest = seal(self.mac, key, KnownEntities.of(self._written.get(generation, ())).encode())
        try:
            if self.cluster:
                from scoring_service.adapters.redis import cluster_writer

                cluster_writer.set_value(self.url, key.encode(), manifest, self.ttl_s)
            else:
                redis.Redis.from_url(self.url, socket_timeout=30).set(key, manifest, ex=self.ttl_s)
        except redis.RedisError as exc:
            raise CacheWriteError(f"writing the manifest of generation {generation} failed: {exc}") from None
        if self.cluster:
            from scoring_service.adapters.redis import cluster_writer

            return cluster_writer.switch_generation(self.url, model_version, generation, sample=sample)
        return switch_generation(self.url, model_version, generation, sample=sample)
