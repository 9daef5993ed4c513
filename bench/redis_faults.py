"""Latency of Score() with Redis direct vs behind the delaying TCP proxy, in one run (issue 13).

    uv run python -m bench.redis_faults                  # ~1 min on 2 cores
    uv run python -m bench.redis_faults --calls 2000 --concurrency 8 --delays-ms 5,50

One real Redis, one model (trained on simulated payments), two ``fraudscore serve`` processes with
the production defaults (budget 100 ms, Redis timeout 15 ms): one pointed at Redis directly, one
through ``tests/servers/delay_proxy.py``. The same closed-loop traffic (90 % cards a batch run
knows, 10 % new cards; ``--concurrency`` calls in flight) runs against: the direct server; the
proxied one in ``pass`` mode; with each ``--delays-ms`` per chunk each way (a round trip costs twice
that: below the Redis timeout the reads are slow but in time, above it they time out); black-holed;
reset. Per phase it prints the caller's wall time and the server's ``latency_ms`` (p50, p99, max),
the status codes, the sources and the degraded share, and whether the p99 held the budget. JSON on
stdout (one object), progress on stderr; the figure for the docs is ``p99_ms`` of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import redis

from bench.common import REPO, log
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

CACHED_SHARE = 0.9


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _request(customer: str) -> scoring_pb2.ScoreRequest:
    r = scoring_pb2.ScoreRequest(request_id=uuid.uuid4().hex, transaction=scoring_pb2.Transaction(
        transaction_id=uuid.uuid4().hex, customer_id=customer, terminal_id="T1", amount=25.0))
    r.transaction.timestamp.GetCurrentTime()
    return r


async def _phase(address: str, cached: list[str], calls: int, concurrency: int, budget_ms: float) -> dict[str, Any]:
    wall: list[float] = []
    server: list[float] = []
    codes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    degraded = 0
    counter = iter(range(calls))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = scoring_pb2_grpc.FraudScoringStub(ch)

        async def caller() -> None:
            nonlocal degraded
            for i in counter:
                customer = cached[i % len(cached)] if (i % 10) < CACHED_SHARE * 10 else f"bench-new-{uuid.uuid4().hex[:10]}"
                t = time.perf_counter()
                try:
                    answer = await stub.Score(_request(customer), timeout=2.0)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    continue
                wall.append((time.perf_counter() - t) * 1000)
                server.append(answer.latency_ms)
                codes["OK"] += 1
                sources[scoring_pb2.Source.Name(answer.source)] += 1
                degraded += answer.degraded

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    p99 = _percentile(wall, 0.99)
    return {
        "calls": calls, "codes": dict(codes), "sources": dict(sources), "degraded_share": round(degraded / max(1, len(wall)), 3),
        "wall_ms": {"p50": round(_percentile(wall, 0.5), 2), "p99": round(p99, 2), "max": round(max(wall, default=0), 2)},
        "server_latency_ms": {"p50": round(_percentile(server, 0.5), 2), "p99": round(_percentile(server, 0.99), 2),
                              "max": round(max(server, default=0), 2)},
        "p99_within_budget": p99 <= budget_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per phase")
    ap.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    ap.add_argument("--delays-ms", default="5,50", help="proxy delays per chunk each way, comma-separated")
    ap.add_argument("--cached-cards", type=int, default=500)
    args = ap.parse_args()

    from scoring_service.bootstrap import registry as open_registry
    from scoring_service.config import Settings
    from scoring_service.core.cache_layout import CUSTOMER, CacheEntry, active_generation_key, entity_key
    from scoring_service.core.features import advance_customer_state
    from scoring_service.training.registration import train_and_register
    from scoring_service.training.simulator import simulate
    from tests.servers.delay_proxy import DelayProxy
    from tests.servers.redis import TEST_CACHE_MAC_KEYS, RedisServer, sealed_item
    from tests.servers.scorer import ScorerProcess

    budget_ms = 100.0
    env = {"FRAUDSCORE_BUDGET_MS": str(budget_ms), "FRAUDSCORE_REDIS_TIMEOUT_MS": "15", "FRAUDSCORE_LOG_REQUESTS": "false",
           "OMP_NUM_THREADS": "1",
           "FRAUDSCORE_CACHE_MAC_KEYS": TEST_CACHE_MAC_KEYS}  # the entries below are sealed with it
    with tempfile.TemporaryDirectory(prefix="fs-redis-faults-") as tmp:
        data_dir = Path(tmp)
        log("training a model on simulated payments")
        payments = simulate(n_customers=400, n_terminals=800, start_date="2018-04-01", n_days=50, seed=11,
                            card_testing_per_day=0.0)
        record, _ = train_and_register(open_registry(Settings(data_dir=data_dir)), Settings(data_dir=data_dir).models_dir,
                                       payments=payments, activate=True, description="bench redis_faults")
        server = RedisServer().start()
        proxy = DelayProxy(server.port).start()
        client = redis.Redis.from_url(server.url)
        client.set(active_generation_key(record.version), "g-bench")
        state = None
        for i in range(20):
            state = advance_customer_state(state, 25.0, 1.7e9 - 3600 * (20 - i))
        assert state is not None
        cached = [f"bench-cached-{i}" for i in range(args.cached_cards)]
        for c in cached:
            entry = CacheEntry(0.01, state, record.version, 1.7e9, [], "g-bench")
            client.set(*sealed_item(entity_key(record.version, "g-bench", CUSTOMER, c), entry))
        direct = ScorerProcess(data_dir, server.url, env=env)
        proxied = ScorerProcess(data_dir, proxy.url, env=env)
        phases: dict[str, Any] = {}
        try:
            direct.start()
            proxied.start()
            plan: list[tuple[str, ScorerProcess, str, float]] = [("direct", direct, "pass", 0.0),
                                                                 ("proxy pass", proxied, "pass", 0.0)]
            plan += [(f"proxy delay {d} ms", proxied, "delay", float(d) / 1000) for d in args.delays_ms.split(",") if d]
            plan += [("proxy blackhole", proxied, "blackhole", 0.0), ("proxy reset", proxied, "reset", 0.0),
                     ("proxy pass again", proxied, "pass", 0.0)]
            for name, scorer, mode, delay in plan:
                proxy.set_mode(mode, delay_s=delay)  # type: ignore[arg-type]
                if name == "proxy pass again":
                    time.sleep(1.0)  # the breaker's reset period: its trial call closes it
                log(f"{name}: {args.calls} calls, {args.concurrency} in flight")
                phases[name] = asyncio.run(_phase(scorer.address, cached, args.calls, args.concurrency, budget_ms))
                log(f"{name}: {phases[name]['wall_ms']} sources {phases[name]['sources']}")
            breaker = {"open": len(proxied.log_events("redis.breaker_open")),
                       "closed": len(proxied.log_events("redis.breaker_closed"))}
        finally:
            direct.stop()
            proxied.stop()
            proxy.stop()
            server.stop()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "bench": "redis_faults", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": rev,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "budget_ms": budget_ms, "redis_timeout_ms": 15, "concurrency": args.concurrency, "cached_share": CACHED_SHARE,
        "phases": phases, "breaker_events": breaker,
    }, indent=2))


if __name__ == "__main__":
    main()
