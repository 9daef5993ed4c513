"""What a flood of wrong API keys from one address costs a good key's calls: p50/p99 alone and during it.

    uv run python -m bench.auth_flood [--seconds 12] [--flood-rps 650] [--good-rps 100]

One real `fraudscore serve` (API keys required, one process, a real Redis, plaintext), its CPU
at rest measured first. Then, for ``--seconds`` each: a good key's calls alone at ``--good-rps``
(open loop, customers whose risk is cached); ``--flood-rps`` calls with a new random well-formed
key each, alone; as many calls without any key, alone (the cheapest refusal there is: no key work,
only gRPC's and the interceptors' own cost); and the good key again while another process floods
wrong keys from the same address (127.0.0.1). For each load alone: the server's CPU per call, less
its CPU at rest, and its auth counters. Issue 21 measured 4.2/11.3 ms alone and 217/364 ms during a
650/s flood before failed authentication was limited per address (online/auth.py: every wrong key
was a thread hop and a SQL lookup, and 10,000 of them emptied the lookup cache, good keys too).
The load generators share the machine with the server: compare the phases of one run. Prints one
JSON document (also written to bench/results/auth-flood-<time>.json). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import tree_cpu_seconds  # noqa: E402
from scoring_service.bootstrap import key_store, registry  # noqa: E402
from scoring_service.config import Settings  # noqa: E402
from scoring_service.online.auth import FAILED_AUTH_BURST, FAILED_AUTH_PER_S  # noqa: E402
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc  # noqa: E402
from tests.servers.common import free_port  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402
from tests.servers.scorer import ScorerProcess  # noqa: E402

PEPPER = "bench-pepper-0123456789abcdef0123"
HOT_CUSTOMERS = 200
WRONG, NONE = "<a new random key per call>", "<no key>"


def _request(customer: str, n: int) -> Any:
    return scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
        transaction_id=f"af-{customer}-{n}", customer_id=customer, terminal_id=str(n % 50), amount=25.0 + n % 40))


async def _open_loop(address: str, rps: float, seconds: float, key: str) -> dict[str, Any]:
    """``rps`` calls a second for ``seconds``, each sent on time whatever the earlier ones do, with
    ``key``: the good caller's (latency of each answer), ``WRONG`` (a new random key per call) or
    ``NONE`` (no key at all: the cheapest call to refuse, no key work)."""
    channel = grpc.aio.insecure_channel(address)
    stub = scoring_pb2_grpc.FraudScoringStub(channel)
    latencies: list[float] = []
    codes: dict[str, int] = {}

    async def one(n: int) -> None:
        secret = "fsk_" + secrets.token_urlsafe(32) if key == WRONG else key
        metadata = () if key == NONE else (("x-api-key", secret),)
        t0 = time.perf_counter()
        try:
            await stub.Score(_request(f"hot-{n % HOT_CUSTOMERS}", n), metadata=metadata, timeout=2)
            latencies.append((time.perf_counter() - t0) * 1000)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1

    tasks = []
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rps) + 1
        tasks += [asyncio.create_task(one(n)) for n in range(sent, due)]
        sent = due
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    wall = time.monotonic() - start
    await channel.close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 100 else [float("nan")] * 99
    return {"sent": sent, "sent_per_s": round(sent / seconds, 1), "codes": codes,
            "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "wall_s": round(wall, 2)}


def _flood(address: str, rps: float, seconds: float, out: Any) -> None:
    """The flooding client, in a process of its own (its event loop does not delay the good caller's)."""
    out.put(asyncio.run(_open_loop(address, rps, seconds, WRONG)))


async def _warm(address: str, key: str) -> None:
    """Score every hot customer once: the write-back caches its entity risk, later calls are hits."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.FraudScoringStub(channel)
        for i in range(HOT_CUSTOMERS):
            await stub.Score(_request(f"hot-{i}", 0), metadata=(("x-api-key", key),), timeout=5)
    await asyncio.sleep(0.5)  # the write-backs run after the answers


def _auth_counters(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name in ("fraudscore_auth_refused_total", "fraudscore_auth_lookups_total"):
                out[f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}"] = s.value
    return out


def _counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--flood-rps", type=float, default=650.0)
    ap.add_argument("--good-rps", type=float, default=100.0)
    args = ap.parse_args()

    from scoring_service.training.registration import train_and_register
    from scoring_service.training.simulator import simulate

    def say(msg: str) -> None:
        print(f"[auth_flood {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    redis = RedisServer().start()
    tmp = tempfile.TemporaryDirectory(prefix="fs-auth-flood-")
    data_dir = Path(tmp.name)
    proc = None
    try:
        settings = Settings(data_dir=data_dir, key_pepper=PEPPER)
        say("training a model on simulated payments")
        payments = simulate(n_customers=400, n_terminals=800, start_date="2018-04-01", n_days=50, seed=11,
                            card_testing_per_day=0.0)
        train_and_register(registry(settings), settings.models_dir, payments=payments, activate=True, description="bench")
        _, key = key_store(settings).create("bench", ["score"], rate_per_s=1e9, burst=10**9)
        assert key is not None
        metrics_port = free_port()
        env = {"FRAUDSCORE_AUTH": "required", "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_LOG_REQUESTS": "false",
               "FRAUDSCORE_DRAIN_S": "0", "FRAUDSCORE_MAX_QUEUE_MS": "0", "FRAUDSCORE_MAX_IN_FLIGHT": "100000",
               "FRAUDSCORE_METRICS_PORT": str(metrics_port)}
        proc = ScorerProcess(data_dir, redis.url, env=env).start(timeout=600)
        pid = proc.proc.pid if proc.proc else 0
        asyncio.run(_warm(proc.address, key))
        cpu0 = tree_cpu_seconds([pid])
        time.sleep(args.seconds)
        idle_cpu_per_s = (tree_cpu_seconds([pid]) - cpu0) / args.seconds  # the server's own timers, threads

        def alone(key: str, rps: float) -> dict[str, Any]:
            """One load alone, with the server's CPU per call (less its idle CPU) and its auth counters."""
            before, cpu0 = _auth_counters(metrics_port), tree_cpu_seconds([pid])
            result = asyncio.run(_open_loop(proc.address, rps, args.seconds, key))
            cpu = tree_cpu_seconds([pid]) - cpu0 - idle_cpu_per_s * result["wall_s"]
            result["server_cpu_us_per_call"] = round(cpu / max(1, result["sent"]) * 1e6, 1)
            result["auth_counters"] = _counters_delta(before, _auth_counters(metrics_port))
            time.sleep(FAILED_AUTH_BURST / FAILED_AUTH_PER_S + 1.0)  # the address' failure budget full again
            say(json.dumps(result))
            return result

        say(f"good key alone: {args.good_rps:g}/s for {args.seconds:g} s")
        good_alone = alone(key, args.good_rps)
        say(f"{args.flood_rps:g}/s wrong keys alone, then {args.flood_rps:g}/s calls without a key")
        wrong_alone = alone(WRONG, args.flood_rps)
        none_alone = alone(NONE, args.flood_rps)
        say("the good key during the wrong keys' flood (from another process)")
        before = _auth_counters(metrics_port)
        spawn = multiprocessing.get_context("spawn")
        out: Any = spawn.Queue()
        flooder = spawn.Process(target=_flood, args=(proc.address, args.flood_rps, args.seconds + 2.0, out))
        flooder.start()
        time.sleep(1.0)  # the flood under way (the spawned process imports grpc first)
        during = asyncio.run(_open_loop(proc.address, args.good_rps, args.seconds, key))
        flood = out.get(timeout=120)
        flooder.join(timeout=30)
        report = {
            "bench": "auth_flood", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": args.seconds, "good_rps": args.good_rps, "flood_rps": args.flood_rps,
            "server_idle_cpu_per_s": round(idle_cpu_per_s, 3),
            "good_alone": good_alone, "wrong_keys_alone": wrong_alone, "no_key_alone": none_alone,
            "good_during_flood": during, "flood_during": flood,
            "auth_counters_during_flood": _counters_delta(before, _auth_counters(metrics_port)),
            "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        }
        out_path = REPO / "bench" / "results" / f"auth-flood-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
        out_path.parent.mkdir(exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    finally:
        if proc is not None:
            proc.stop()
        redis.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
