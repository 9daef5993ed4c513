"""The batch writer's functions (``cache_writer``) for a Redis Cluster, through redis-py's ``RedisCluster``.

Same keys, same contract: every ``SET key value EX ttl`` of a generation is acknowledged by the
node that owns its slot before :func:`switch_generation` points ``fs:1:<model>:active`` at the
generation with one ``SET``. That pointer is one key, on one node: the switch is as atomic as on a
single Redis, and a reader that sees the new pointer finds every entry of the new generation
(written, and acknowledged by its primary, before the pointer moved); a reader that has not yet
seen it reads the old generation, untouched until its TTL. Bulk writes go to each node through
``cache_writer``'s fast path (see :func:`write_items`); the rest through redis-py's ``RedisCluster``,
which follows MOVED/ASK itself. AUTH and TLS come from the URL as for ``cache_writer``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from scoring_service.adapters.redis import cache_writer
from scoring_service.adapters.redis.cache_writer import CacheWriteError, WriteStats, _text
from scoring_service.adapters.redis.cluster import key_slot, node_url, parse_slots
from scoring_service.adapters.redis.resp import redact_url
from scoring_service.core.cache_layout import active_generation_key, generation_pattern
from scoring_service.logging import get_logger

log = get_logger(__name__)

__all__ = ["active_generation", "delete_generation", "slot_owners", "switch_generation", "write_items"]


def _connect(url: str, timeout: float) -> RedisCluster:
    try:
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except RedisError as exc:
        raise CacheWriteError(f"cannot reach the Redis Cluster at {redact_url(url)}: {exc}") from None


def slot_owners(url: str, timeout: float = 10.0) -> list[tuple[str, int] | None]:
    """Who serves each slot (``CLUSTER SLOTS`` of the node at ``url``)."""
    u = urlparse(url)
    try:
        reply = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).execute_command(
            "CLUSTER", "SLOTS")
    except RedisError as exc:
        raise CacheWriteError(f"cannot read the slot map of the Redis Cluster at {redact_url(url)}: {exc}") from None
    return parse_slots(reply, (u.hostname or "localhost", u.port or 6379))


def write_items(url: str, items: Sequence[tuple[bytes, bytes]], ttl_s: int, *, connections: int = 4,
                chunk: int = 5000, timeout: float = 30.0, progress: Callable[[int], None] | None = None) -> WriteStats:
    """SET every (key, value) with EX ttl on the node serving its slot; CacheWriteError unless all succeed.

    The items are split by node (slot map read once) and each node's share goes through the single
    Redis fast path (``cache_writer.write_items``: RESP packed once per chunk, ``connections`` per
    node), all nodes at once. A slot that moves meanwhile (MOVED/ASK: a resharding) makes the whole
    write start again through redis-py's ``RedisCluster``, which follows redirections (SETs are
    idempotent)."""
    started = time.perf_counter()
    if not items:
        return WriteStats(0, 0.0)
    owners = slot_owners(url, timeout)
    shares: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
    for item in items:
        owner = owners[key_slot(item[0])]
        if owner is None:
            raise CacheWriteError(f"slot {key_slot(item[0])} is served by no node of the Redis Cluster: not writing")
        shares.setdefault(owner, []).append(item)
    try:
        with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="cluster-writer") as pool:
            jobs = [pool.submit(cache_writer.write_items, node_url(url, addr), share, ttl_s, connections=connections,
                                chunk=chunk, timeout=timeout, progress=progress) for addr, share in shares.items()]
            total = sum(job.result().keys for job in jobs)
    except CacheWriteError as exc:
        if "MOVED" not in str(exc) and "ASK" not in str(exc):
            raise
        log.warning("cache.cluster_write_redirected", error=str(exc)[:200], note="writing again through RedisCluster")
        total = _write_following_redirects(url, items, ttl_s, chunk=chunk, timeout=timeout).keys
    return WriteStats(total, time.perf_counter() - started)


def _write_following_redirects(url: str, items: Sequence[tuple[bytes, bytes]], ttl_s: int, *, chunk: int,
                               timeout: float) -> WriteStats:
    """The slow path: redis-py's cluster pipeline (follows MOVED/ASK, refreshes its slot map)."""
    started = time.perf_counter()
    r = _connect(url, timeout)
    written = 0
    try:
        for i in range(0, len(items), chunk):
            part = items[i: i + chunk]
            pipe = r.pipeline(transaction=False)
            for key, value in part:
                pipe.set(key, value, ex=int(ttl_s))
            replies = pipe.execute(raise_on_error=False)
            bad = [x for x in replies if x is not True]
            if bad:
                raise CacheWriteError(f"the Redis Cluster refused a bulk write: {str(bad[0])[:200]}")
            written += len(part)
    except RedisError as exc:
        raise CacheWriteError(f"Redis Cluster write failed: {exc}") from None
    finally:
        r.close()
    return WriteStats(written, time.perf_counter() - started)


def active_generation(url: str, model_version: str) -> str | None:
    r = _connect(url, 5.0)
    try:
        return _text(r.get(active_generation_key(model_version)))
    finally:
        r.close()


def set_value(url: str, key: bytes, value: bytes, ttl_s: int) -> None:
    """One ``SET key value EX ttl_s`` on the key's node (a generation's manifest)."""
    r = _connect(url, 30.0)
    try:
        r.set(key, value, ex=ttl_s)
    finally:
        r.close()


def switch_generation(url: str, model_version: str, generation: str, sample: Iterable[bytes] = ()) -> str | None:
    """Point the model's active generation at ``generation`` (one SET, on the pointer's node); the previous one.

    ``sample``: keys that must exist first (checked one by one: they lie in different slots)."""
    r = _connect(url, 10.0)
    try:
        keys = list(sample)
        if keys:
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            present = sum(int(x) for x in pipe.execute())
            if present != len(keys):
                raise CacheWriteError(
                    f"only {present} of {len(keys)} sampled keys of generation {generation} exist: not switching")
        return _text(r.set(active_generation_key(model_version), generation, get=True))
    except RedisError as exc:
        raise CacheWriteError(f"Redis Cluster switch failed: {exc}") from None
    finally:
        r.close()


def delete_generation(url: str, model_version: str, generation: str, batch: int = 5000) -> int:
    """Remove a generation's entries on every primary (a failed run's leftovers); never the active pointer."""
    r = _connect(url, 30.0)
    n = 0
    try:
        for node in r.get_primaries():
            client = r.get_redis_connection(node)
            pending: list[bytes] = []

            def unlink(keys: list[bytes], client: Redis = client) -> int:  # a key per command: many slots per node
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.unlink(key)
                return sum(int(x) for x in pipe.execute())

            for k in client.scan_iter(match=generation_pattern(model_version, generation), count=batch):
                pending.append(k)
                if len(pending) >= batch:
                    n += unlink(pending)
                    pending.clear()
            if pending:
                n += unlink(pending)
    finally:
        r.close()
    return n
