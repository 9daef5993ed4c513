"""What TLS and API keys cost the request path, in one run: hits and unseen payments, closed loop.

    uv run python -m bench.security_cost [--seconds 4] [--concurrency 8] [--workers 1]

Four variants of one real `fraudscore serve` (same registry, same Redis, one after the other):
plaintext without authentication, plaintext + key, TLS without authentication, TLS + key (the key
checked, the scope checked, the per-key token bucket in Redis: one EVALSHA per call). For each, two
mixes: ``hits`` (customers whose entity risk is cached: one Redis round trip) and ``unseen`` (a new
customer per call: the model). The load generator (grpc.aio, ``--concurrency`` calls in flight over
4 channels) runs on the same machine, so read the ratios between variants, not the absolute rates.
Prints one JSON document (also written to bench/results/security-cost-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import tree_cpu_seconds  # noqa: E402
from bench.mac_cost import micro as mac_micro  # noqa: E402
from scoring_service.bootstrap import key_store, registry  # noqa: E402
from scoring_service.config import Settings  # noqa: E402
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc  # noqa: E402
from tests.servers.certs import TestCA  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402
from tests.servers.scorer import ScorerProcess  # noqa: E402

PEPPER = "bench-pepper-0123456789abcdef0123"
HOT_CUSTOMERS = 200


def _request(customer: str, n: int) -> Any:
    return scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
        transaction_id=f"b-{customer}-{n}", customer_id=customer, terminal_id=str(n % 50), amount=25.0 + n % 40))


def _channel(proc: ScorerProcess, i: int) -> grpc.aio.Channel:
    opts = [("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)]
    if proc.tls_ca is None:
        return grpc.aio.insecure_channel(proc.address, options=opts)
    return grpc.aio.secure_channel(proc.address, grpc.ssl_channel_credentials(proc.tls_ca.read_bytes()), options=opts)


async def _load(proc: ScorerProcess, mix: str, seconds: float, concurrency: int, key: str | None,
                prefix: str) -> dict[str, Any]:
    channels = [_channel(proc, i) for i in range(4)]
    stubs = [scoring_pb2_grpc.FraudScoringStub(c) for c in channels]
    metadata = (("x-api-key", key),) if key else ()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal counter
        while time.monotonic() < stop:
            counter += 1
            n = counter
            customer = f"hot-{n % HOT_CUSTOMERS}" if mix == "hits" else f"{prefix}-new-{n}"
            t0 = time.perf_counter()
            try:
                await stubs[w % 4].Score(_request(customer, n), metadata=metadata, timeout=2)
                latencies.append((time.perf_counter() - t0) * 1000)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    pid = proc.proc.pid if proc.proc else None
    cpu0 = tree_cpu_seconds([pid]) if pid else 0.0
    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - start
    # the server's own CPU per answered call (its process tree, from /proc): what TLS and keys add to
    # the service, whatever limits the load generator on the same machine
    cpu_us = (tree_cpu_seconds([pid]) - cpu0) / max(1, len(latencies)) * 1e6 if pid else float("nan")
    for c in channels:
        await c.close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 100 else [float("nan")] * 99
    return {"rps": round(len(latencies) / elapsed, 1), "ok": len(latencies), "errors": errors,
            "p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3), "server_cpu_us_per_call": round(cpu_us, 1)}


async def _warm(proc: ScorerProcess, key: str | None) -> None:
    """Score every hot customer once: the write-back caches its entity risk, later calls are hits."""
    channel = _channel(proc, 99)
    stub = scoring_pb2_grpc.FraudScoringStub(channel)
    metadata = (("x-api-key", key),) if key else ()
    for i in range(HOT_CUSTOMERS):
        await stub.Score(_request(f"hot-{i}", 0), metadata=metadata, timeout=5)
    await asyncio.sleep(0.5)  # the write-backs run after the answers
    await channel.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from scoring_service.training.registration import train_and_register
    from scoring_service.training.simulator import simulate

    def say(msg: str) -> None:
        print(f"[security_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    redis = RedisServer().start()
    tmp = tempfile.TemporaryDirectory(prefix="fs-security-cost-")
    data_dir = Path(tmp.name)
    try:
        settings = Settings(data_dir=data_dir, key_pepper=PEPPER)
        say("training a model on simulated payments")
        payments = simulate(n_customers=400, n_terminals=800, start_date="2018-04-01", n_days=50, seed=11,
                            card_testing_per_day=0.0)
        train_and_register(registry(settings), settings.models_dir, payments=payments, activate=True, description="bench")
        _, key = key_store(settings).create("bench", ["score"], rate_per_s=1e9, burst=10**9)
        ca = TestCA(data_dir / "pki")
        cert, tls_key, _ = ca.issue("server", "localhost", server=True)
        tls_env = {"FRAUDSCORE_TLS_CERT": str(cert), "FRAUDSCORE_TLS_KEY": str(tls_key)}
        variants: list[tuple[str, dict[str, str], bool]] = [
            ("plaintext", {}, False),
            ("plaintext+key", {"FRAUDSCORE_AUTH": "required"}, False),
            ("tls", tls_env, True),
            ("tls+key", {**tls_env, "FRAUDSCORE_AUTH": "required"}, True),
        ]
        results: dict[str, Any] = {}
        for name, extra, tls in variants:
            env = {"FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_LOG_REQUESTS": "false", "FRAUDSCORE_DRAIN_S": "0",
                   "FRAUDSCORE_MAX_QUEUE_MS": "0", "FRAUDSCORE_MAX_IN_FLIGHT": "100000", **extra}
            proc = ScorerProcess(data_dir, redis.url, env=env, args=["--workers", str(args.workers)],
                                 tls_ca=ca.ca_path if tls else None)
            say(f"{name}: starting the server")
            proc.start(timeout=600)
            say(f"{name}: serving; warming {HOT_CUSTOMERS} customers, then {args.seconds:g} s per mix")
            try:
                use_key = key if "key" in name else None
                asyncio.run(_warm(proc, use_key))
                results[name] = {mix: asyncio.run(_load(proc, mix, args.seconds, args.concurrency, use_key, name))
                                 for mix in ("hits", "unseen")}
            except Exception:
                say(f"{name}: failed; the server's log:\n{proc.logs()[-3000:]}")
                raise
            finally:
                proc.stop()
            say(f"{name}: {json.dumps(results[name])}")
        base = results["plaintext"]
        ratios = {name: {mix: round(r[mix]["rps"] / base[mix]["rps"], 3) if base[mix]["rps"] else None
                         for mix in ("hits", "unseen")} for name, r in results.items()}
        cpu_added = {name: {mix: round(r[mix]["server_cpu_us_per_call"] - base[mix]["server_cpu_us_per_call"], 1)
                            for mix in ("hits", "unseen")} for name, r in results.items()}
        # the MAC is always on (every variant pays it); its own cost per hit, measured in this run
        from scoring_service.core.integrity import MacKeys

        mac = mac_micro(20000, MacKeys([("k2", b"k" * 32), ("k1", b"j" * 32)]))
        report = {"bench": "security_cost", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "seconds": args.seconds, "concurrency": args.concurrency, "workers": args.workers,
                  "results": results, "rps_vs_plaintext": ratios, "server_cpu_us_added_vs_plaintext": cpu_added,
                  "mac": mac}
        out = REPO / "bench" / "results" / f"security-cost-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    finally:
        redis.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
