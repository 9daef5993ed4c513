"""Redis memory per key of each kind, measured: ``uv run python -m bench.redis_sizing [--keys 10000]``.

What docs/deploy.md's sizing table ("Redis memory") is made of. A real redis-server (Debian's, no
persistence) is started here, and each kind of key is written by the code that writes it in
production, with values of the size production writes:

- **card and terminal entries**: ``entity_scoring.build_entries`` (the nightly's one definition) on
  simulated payments, scored by a small XGBoost model trained here (~1 min), so the state, the
  risk and the three reasons are real; sealed and written by ``RedisCacheWriter`` under a
  registry-shaped model version and a nightly-shaped generation. ``--keys`` keys of each kind
  (the simulated entries are reused under distinct ids of ``--id-len`` characters).
- **intraday payments**: ``EntityCache.record_payment`` (ZADD + EXPIRE, as the scorer does), for
  cards with 1, 10 and 200 payments each (a sorted set is a compact listpack up to 128 members,
  a skiplist beyond: the cost per payment differs).
- **the generation's manifest** (the entities it holds), where ``RedisCacheWriter.switch_generation``
  writes one.
- **rate-limit buckets**: ``RateLimiter.take`` (the Lua token bucket) for ``--keys`` API keys.

Then **eviction at maxmemory**, per policy (``volatile-ttl`` as shipped in deploy/redis/redis.conf,
with 5 and 10 samples, and ``volatile-lru``): three nights in seconds. Each night a generation of
``--keys`` cards is written and switched by ``RedisCacheWriter`` (TTLs of 1, 2 and 3 days, as
three consecutive nights leave them), and during the following "day" a fifth of its cards are read
through ``EntityCache`` (their LRU clock moves). Before the third night maxmemory is set to what
is used: its write must evict a whole generation. Reported: what is left of each night's read and
unread cards, of each generation's manifest where the writer writes one, and of the pointer.

Each figure is the ``used_memory`` delta of ``INFO memory`` over all the keys of the kind
(the keyspace's dictionary and the TTL table included), divided by the count; ``MEMORY USAGE key
SAMPLES 0`` of 200 keys is printed beside it (per key, without the dictionaries' share). Prints
JSON; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.core.cache_layout import CUSTOMER, TERMINAL, CacheEntry, EntityKind, entity_key, intraday_key
from scoring_service.core.integrity import MacKeys
from tests.servers.redis import RedisServer

MAC = MacKeys([("k1", b"bench-redis-sizing-mac-key-0001")])
TTL_S = 3 * 86400


def _model_version() -> str:
    """A version as the registry names them (``Registry.next_version``), from a registry in a temporary folder."""
    from scoring_service import bootstrap
    from scoring_service.config import Settings

    with tempfile.TemporaryDirectory(prefix="fs-sizing-registry-") as folder:
        return bootstrap.registry(Settings(data_dir=Path(folder))).next_version("xgb")


def _real_entries(seed: int) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Card and terminal entries as the nightly builds them, from simulated payments and a small trained model."""
    from scoring_service.adapters.model.gbdt import GbdtModel
    from scoring_service.core.entity_scoring import build_entries
    from scoring_service.core.features import normalise_handbook
    from scoring_service.training.simulator import simulate
    from scoring_service.training.train import train_on_payments

    payments = normalise_handbook(simulate(n_customers=600, n_terminals=1200, n_days=50, seed=seed))
    with tempfile.TemporaryDirectory(prefix="fs-sizing-") as folder:
        result = train_on_payments(payments, folder)
        model = GbdtModel.load(result.artifact_path, result.framework, result.feature_names)
        as_of = payments["timestamp"].max()
        customers, terminals = build_entries(payments, as_of, model, "xgb-bench", "20260101T000000-r1-abcdef")
    return list(customers.values()), list(terminals.values())


def _ids(n: int, length: int, rng: random.Random) -> list[str]:
    alphabet = string.ascii_lowercase + string.digits
    return ["".join(rng.choices(alphabet, k=length)) for _ in range(n)]


def _used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def _measure(r: redis.Redis, count: int, write: Callable[[], object], sample_keys: Sequence[str]) -> dict[str, Any]:
    """``used_memory`` before and after ``write`` (which adds ``count`` of something), and MEMORY USAGE of samples."""
    before = _used(r)
    write()
    after = _used(r)
    usage = [int(r.memory_usage(k, samples=0) or 0) for k in sample_keys]
    return {"count": count, "used_memory_delta": after - before, "bytes_each": round((after - before) / count, 1),
            "memory_usage_mean": round(sum(usage) / len(usage), 1) if usage else None}


def _entries(r: redis.Redis, writer: RedisCacheWriter, version: str, generation: str, kind: EntityKind,
             pool: list[CacheEntry], n: int, id_len: int, rng: random.Random) -> dict[str, Any]:
    ids = _ids(n, id_len, rng)
    items = [(entity_key(version, generation, kind, i).encode(), pool[j % len(pool)].encode()) for j, i in enumerate(ids)]
    out = _measure(r, n, lambda: writer.write_items(items), [k.decode() for k, _ in items[:200]])
    out["key_bytes"] = round(sum(len(k) for k, _ in items) / n, 1)
    out["value_bytes"] = round(sum(len(r.get(k) or b"") for k, _ in items[:200]) / min(n, 200), 1)
    return out


def _intraday(r: redis.Redis, url: str, cards: int, per_card: int, id_len: int, rng: random.Random) -> dict[str, Any]:
    ids = _ids(cards, id_len, rng)
    now = time.time()

    async def record() -> None:
        cache = EntityCache(url, timeout_s=1.0, ttl_s=TTL_S, breaker=CircuitBreaker(5, 1.0), mac=MAC)
        for j in range(per_card):
            for i, card in enumerate(ids):
                cache.record_payment(card, now - 3600 + j + i * 1e-3, round(rng.uniform(1, 500), 2),
                                     f"tx-{card}-{j:06d}", trim=False)
            await cache.drain()
        await cache.close()

    out = _measure(r, cards * per_card, lambda: asyncio.run(record()), [intraday_key(c) for c in ids[:200]])
    out.update(cards=cards, payments_per_card=per_card, bytes_per_card=round(out["used_memory_delta"] / cards, 1),
               encoding=(r.object("encoding", intraday_key(ids[0])) or b"").decode())
    return out


def _buckets(r: redis.Redis, url: str, n: int) -> dict[str, Any]:
    async def take() -> None:
        limiter = RateLimiter(url, timeout_s=1.0)
        for key_id in range(1, n + 1):
            verdict = await limiter.take(key_id, 1.0, 100)  # a slow refill: the bucket lives ~100 s, past the measurement
            assert verdict.shared, "the rate limiter fell back to its per-process bucket"
        await limiter.close()

    return _measure(r, n, lambda: asyncio.run(take()), [f"fs:rl:{i}" for i in range(1, 201)])


def _eviction(policy: str, samples: int, pool: list[CacheEntry], n: int, id_len: int, rng: random.Random) -> dict[str, Any]:
    """Three nights in seconds (see the module docstring); what each policy evicts to make room for the third."""
    server = RedisServer(extra_args=("--maxmemory-policy", policy, "--maxmemory-samples", str(samples))).start()
    try:
        url, r = server.url, redis.Redis.from_url(server.url)
        version = _model_version()
        cards = [_ids(n, id_len, rng) for _ in range(3)]
        hot = n // 5  # the first fifth of each night's cards pay (are read) during the following day
        generations: list[str] = []
        manifests_written: list[bool] = []

        async def day(generation: str, read: Sequence[str]) -> None:
            cache = EntityCache(url, timeout_s=2.0, ttl_s=TTL_S, breaker=CircuitBreaker(5, 1.0), mac=MAC)
            assert await cache.refresh_generation(version) == generation
            for i in range(0, len(read), 100):
                await cache.read_many(version, [(c, "t-none") for c in read[i: i + 100]], 2.0, intraday=False)
            await cache.close()

        for night in range(3):
            generation = f"2026010{night + 1}T020000-r{night + 1}-{os.urandom(3).hex()}"
            items = [(entity_key(version, generation, CUSTOMER, c).encode(), pool[j % len(pool)].encode())
                     for j, c in enumerate(cards[night])]
            if night == 2:
                time.sleep(2.0)
                r.config_set("maxmemory", _used(r))  # no room left: the third night's write evicts a generation
            writer = RedisCacheWriter(url, (night + 1) * 86400, connections=1, mac=MAC)  # later nights: longer TTLs
            writer.write_items(items)
            writer.switch_generation(version, generation, [items[0][0]])
            generations.append(generation)
            manifests_written.append(bool(r.exists(f"fs:1:{version}:{generation}:manifest")))
            if night < 2:
                time.sleep(2.0)  # Redis' LRU clock ticks once a second: the day's reads come after the night's writes
                asyncio.run(day(generation, cards[night][:hot]))

        def left(night: int, part: slice) -> float:
            keys = [entity_key(version, generations[night], CUSTOMER, c) for c in cards[night][part]]
            return round(sum(int(r.exists(*keys[i: i + 500])) for i in range(0, len(keys), 500)) / len(keys), 4)

        return {
            "evicted_keys": int(r.info("stats")["evicted_keys"]),
            "left": {"night 1, read": left(0, slice(None, hot)), "night 1, unread": left(0, slice(hot, None)),
                     "night 2 (active until night 3), read": left(1, slice(None, hot)),
                     "night 2 (active until night 3), unread": left(1, slice(hot, None)),
                     "night 3 (active)": left(2, slice(None))},
            "manifests_written": manifests_written,
            "manifests_left": [bool(r.exists(f"fs:1:{version}:{g}:manifest")) for g in generations],
            "pointer_left": bool(r.exists(f"fs:1:{version}:active")),
        }
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.redis_sizing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000, help="keys of each kind")
    ap.add_argument("--id-len", type=int, default=16, help="characters of a card or terminal id (a 16-character token)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.time()
    customers, terminals = _real_entries(args.seed)
    server = RedisServer().start()
    try:
        r = redis.Redis.from_url(server.url)
        version = _model_version()
        generation = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-r42-{os.urandom(3).hex()}"
        out: dict[str, Any] = {
            "redis": r.info("server")["redis_version"], "allocator": r.info("memory")["mem_allocator"],
            "model_version": version, "generation": generation, "id_len": args.id_len,
            "entries_from": {"customers": len(customers), "terminals": len(terminals)},
            "baseline_used_memory": _used(r),
        }
        writer = RedisCacheWriter(server.url, TTL_S, connections=1, mac=MAC)
        out["card_entry"] = _entries(r, writer, version, generation, CUSTOMER, customers, args.keys, args.id_len, rng)
        out["terminal_entry"] = _entries(r, writer, version, generation, TERMINAL, terminals, args.keys, args.id_len, rng)
        writer.switch_generation(version, generation, [])  # and its manifest, where the writer writes one
        manifest = f"fs:1:{version}:{generation}:manifest"  # where the writer keeps the generation's manifest, if it writes one
        out["manifest"] = ({"entities": 2 * args.keys, "memory_usage": r.memory_usage(manifest, samples=0),
                            "bytes_per_entity": round(int(r.memory_usage(manifest, samples=0) or 0) / (2 * args.keys), 2)}
                           if r.exists(manifest) else "not written by this version's RedisCacheWriter")
        out["intraday"] = {f"{p}_per_card": _intraday(r, server.url, max(1, args.keys // p), p, args.id_len, rng)
                           for p in (1, 10, 200)}
        out["rate_limit_bucket"] = _buckets(r, server.url, args.keys)
        memory = r.info("memory")
        out["end"] = {k: memory[k] for k in ("used_memory", "used_memory_rss", "mem_fragmentation_ratio")}
    finally:
        server.stop()
    out["eviction"] = {f"{policy} samples={samples}": _eviction(policy, samples, customers, args.keys, args.id_len, rng)
                       for policy, samples in (("volatile-ttl", 5), ("volatile-ttl", 10), ("volatile-lru", 5))}
    out["seconds"] = round(time.time() - started, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
