"""Cache refresh write rate: ``uv run python -m bench.cache_write [--keys 500000]``.

Writes one generation's worth of entries (``SET key value EX ttl``, values of a real entry's
size) into a real redis-server started here, with ``scoring_service.adapters.redis.cache_writer.write_items`` on 1
and 4 connections, and with the reference: one redis-py pipeline (``transaction=False``,
chunks of 1,000). Prints JSON (keys/s per variant and the ratio to the reference, measured in
the same run: the machine is shared, compare ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from scoring_service.adapters.redis import cache_writer as cw
from scoring_service.core.cache_layout import CacheEntry
from tests.servers.redis import RedisServer


def _items(n: int) -> list[tuple[bytes, bytes]]:
    value = CacheEntry(risk_score=0.0123, state={f"f{i}": float(i) for i in range(12)}, model_version="xgb-bench",
                       computed_at=time.time(), reasons=[("AMOUNT_HIGH", "amount", 0.5)] * 3).encode()
    return [(b"fs:1:xgb-bench:g1:c:%d" % i, value) for i in range(n)]


def _reference(url: str, items: Sequence[tuple[bytes, bytes]], ttl: int) -> float:
    r = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    for i in range(0, len(items), 1000):
        pipe = r.pipeline(transaction=False)
        for k, v in items[i : i + 1000]:
            pipe.set(k, v, ex=ttl)
        pipe.execute()
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_write", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N per variant")
    args = ap.parse_args(argv)
    items = _items(args.keys)
    server = RedisServer().start()
    try:
        out: dict[str, Any] = {"keys": args.keys, "value_bytes": len(items[0][1]), "cores": os.cpu_count(),
                               "loadavg_at_start": os.getloadavg(), "variants": {}}
        r = redis.Redis.from_url(server.url)
        best: dict[str, float] = {}
        variants: list[tuple[str, Callable[[], float]]] = [
            ("redis-py pipeline, 1 connection (reference)", lambda: _reference(server.url, items, 600)),
            ("cache_writer, 1 connection", lambda: cw.write_items(server.url, items, 600, connections=1).seconds),
            ("cache_writer, 4 connections", lambda: cw.write_items(server.url, items, 600, connections=4).seconds),
        ]
        for _ in range(args.repeat):
            for name, fn in variants:
                r.flushdb()
                secs = fn()
                if r.dbsize() != args.keys:
                    raise SystemExit(f"{name}: {r.dbsize()} keys in Redis, expected {args.keys}")
                best[name] = min(best.get(name, float("inf")), secs)
        ref = best["redis-py pipeline, 1 connection (reference)"]
        for name, secs in best.items():
            out["variants"][name] = {"seconds": round(secs, 3), "keys_per_s": round(args.keys / secs),
                                     "vs_reference": round(ref / secs, 2)}
        out["loadavg_at_end"] = os.getloadavg()
        print(json.dumps(out, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
