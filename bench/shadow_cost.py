"""What shadow scoring costs the answers: Score() latency with FRAUDSCORE_SHADOW_SHARE 0 and 1.0, one run.

    uv run python -m bench.shadow_cost [--requests 3000] [--concurrency 8] [--data-dir DIR]

One registry (a small model trained on simulated payments the first time) with a shadow version
beside the active one (the same artifact with other thresholds: every payment is scored twice, the
second time in the background). The same load (new cards: every answer is a model call, the
costliest case for the shadow, which scores with the model too) is sent to `fraudscore serve`
with the share at 0, then at 1.0 (embedded Redis, one worker). Prints JSON: client-side p50/p99
(ms) of each, the shadow's scored/dropped counts and the difference. A single run on a shared
machine: read it as an order of magnitude, not a precise figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service.protos import scoring_pb2, scoring_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(data_dir: Path) -> str:
    """The demo model active and a shadow copy of it (never active); returns the shadow's version."""
    from scoring_service.bootstrap import registry as open_registry
    from scoring_service.config import Settings
    from scoring_service.training.registration import train_and_register
    from scoring_service.training.simulator import simulate

    settings = Settings(data_dir=data_dir)
    registry = open_registry(settings)
    active = registry.active()
    if active is None:  # a small model on simulated payments (the e2e tests' size): the cost measured is the serving's
        payments = simulate(n_customers=400, n_terminals=800, start_date="2018-04-01", n_days=50, seed=11,
                            card_testing_per_day=0.0)
        active, _ = train_and_register(registry, settings.models_dir, payments=payments, activate=True,
                                       description="bench.shadow_cost")
    version = f"shadow-{uuid.uuid4().hex[:6]}"
    registry.register(version=version, framework=active.framework, artifact_path=active.artifact_path,
                      sha256=active.sha256, feature_names=active.feature_names,
                      thresholds={"review": active.thresholds["review"] / 2, "decline": active.thresholds["decline"] / 2},
                      policy=active.policy, params=active.params, description="bench.shadow_cost")
    return version


def run(data_dir: Path, share: float, requests: int, concurrency: int) -> dict[str, Any]:
    port, metrics = _free_port(), _free_port()
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(data_dir), "FRAUDSCORE_SHADOW_SHARE": str(share),
           "FRAUDSCORE_METRICS_PORT": str(metrics), "FRAUDSCORE_LOG_REQUESTS": "false", "FRAUDSCORE_REGISTRY_POLL_S": "0.5",
           "FRAUDSCORE_AUTH": "off", "FRAUDSCORE_MAX_QUEUE_MS": "0", "FRAUDSCORE_LOG_LEVEL": "warning"}
    env.pop("REDIS_URL", None)
    log = open(data_dir / f"serve-{share}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "scoring_service.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--drain-s", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 180
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the server did not start; see {log.name}")
                time.sleep(0.2)
            time.sleep(2.0)  # the shadow version is loaded by the rollout watcher
            stub = scoring_pb2_grpc.FraudScoringStub(channel)

            def one(i: int) -> float:
                req = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
                    transaction_id=uuid.uuid4().hex, customer_id=f"b-{uuid.uuid4().hex[:12]}",
                    terminal_id=str(i % 500), amount=float(5 + i % 200)))
                t0 = time.perf_counter()
                stub.Score(req, timeout=5)
                return (time.perf_counter() - t0) * 1000.0

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(200)))  # warm-up
                started = time.perf_counter()
                latencies = np.array(list(pool.map(one, range(requests))))
                wall = time.perf_counter() - started
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    counts = {name: sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))
              for name in ("fraudscore_shadow_scored_total", "fraudscore_shadow_dropped_total")}
    return {"shadow_share": share, "requests": requests, "concurrency": concurrency, "rps": round(requests / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3), "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "shadow_scored": int(counts["fraudscore_shadow_scored_total"]),
            "shadow_dropped": int(counts["fraudscore_shadow_dropped_total"])}


def measure(requests: int, concurrency: int, data_dir: Path | None = None) -> dict[str, Any]:
    """Both runs (share 0, then 1.0) on one registry; what ``main`` prints (``bench.run`` keeps it too)."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="fs-shadow-cost-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    shadow = prepare(data_dir)
    off = run(data_dir, 0.0, requests, concurrency)
    on = run(data_dir, 1.0, requests, concurrency)
    return {"bench": "shadow_cost", "shadow_version": shadow, "off": off, "on": on,
            "p50_delta_ms": round(on["p50_ms"] - off["p50_ms"], 3), "p99_delta_ms": round(on["p99_ms"] - off["p99_ms"], 3)}


def summary(result: dict[str, Any]) -> str:
    """One line of what ``measure`` found."""
    off, on = result["off"], result["on"]
    return (f"shadow scoring (new cards, {off['concurrency']} callers, one worker): "
            f"share 0 {off['rps']}/s p99 {off['p99_ms']} ms; share 1.0 {on['rps']}/s p99 {on['p99_ms']} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.requests, args.concurrency, args.data_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
