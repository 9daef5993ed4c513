"""Backtest: the handbook's test week replayed through the live service, cache-first vs always-model.

One command: ``uv run python -m bench.backtest [--days 7] [--concurrency 8]``. It starts a real
Redis and a real Kafka broker, trains the model on the handbook protocol (``fraudscore train``),
publishes the whole handbook file to Kafka (``fraudscore events publish``), then for each mode
starts ``fraudscore serve --mode M`` and, for each test day D, runs the real nightly job as of D
00:00 (``fraudscore nightly --as-of D``: features from Kafka, new cache generation, atomic switch)
and sends day D's payments as Score() calls. The answers are joined with the labels: served
average precision, Card Precision@100 per day, cache hit ratio and latency percentiles, as JSON
(``bench/results/backtest-<time>.json``) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from scoring_service.adapters.files.payments_file import read_payments_file
from scoring_service.batch.replay import _drive, summarise
from tests.conftest import handbook_path
from tests.servers.kafka import KafkaServer
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess

REPO = Path(__file__).resolve().parent.parent
TEST_START = pd.Timestamp("2018-08-08")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--modes", default="cache-first,always-model")
    args = ap.parse_args()
    data = handbook_path()
    if data is None:
        sys.exit("the handbook file is needed (set FRAUDSCORE_HANDBOOK)")
    work = Path(tempfile.mkdtemp(prefix="fs-backtest-"))
    redis, kafka = RedisServer().start(), KafkaServer().start()
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(work), "REDIS_URL": redis.url,
           "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "FRAUDSCORE_LOG_FORMAT": "json", "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report: dict = {"machine": os.uname().nodename, "cores": os.cpu_count(), "started": started}
    try:
        t = time.monotonic()
        report["train"] = json.loads(cli(env, "train", "--data", str(data)).stdout.strip().splitlines()[-1])
        report["train"]["seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        cli(env, "events", "publish", "--parquet", str(data))
        report["publish_seconds"] = round(time.monotonic() - t, 1)
        payments = read_payments_file(data)
        days = [TEST_START + pd.Timedelta(days=i) for i in range(args.days)]
        for mode in args.modes.split(","):
            scorer = ScorerProcess(work, redis.url, env={"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
                                                         "FRAUDSCORE_LOG_REQUESTS": "false"},
                                   args=["--mode", mode]).start()
            frames, answers, nightly = [], [], []
            try:
                for day in days:
                    t = time.monotonic()
                    run = json.loads(cli(env, "nightly", "--as-of", day.isoformat(), "--json").stdout)
                    nightly.append({"as_of": day.isoformat(), "seconds": round(time.monotonic() - t, 1),
                                    "entities": run.get("entities_scored"), "keys": run.get("keys_written")})
                    time.sleep(1.5)  # the service re-reads the active generation every second
                    todays = payments[(payments["timestamp"] >= day) & (payments["timestamp"] < day + pd.Timedelta(days=1))]
                    frames.append(todays)
                    answers += asyncio.run(_drive(scorer.address, todays, 0.0, args.concurrency, 2.0, None))
                    print(f"{mode} {day.date()}: {len(todays)} payments", flush=True)
            finally:
                scorer.stop()
            summary = summarise(pd.concat(frames, ignore_index=True), answers)
            summary["nightly_runs"] = nightly
            report[mode] = summary
    finally:
        kafka.stop()
        redis.stop()
    out = REPO / "bench" / "results" / f"backtest-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    modes = [m for m in args.modes.split(",") if m in report]
    print(f"\n{'metric':<28}" + "".join(f"{m:>16}" for m in modes))
    for key in ("requests", "errors", "degraded", "average_precision", "card_precision_at_100", "cache_hit_ratio"):
        cells = (f"{report[m][key]:>16.4f}" if isinstance(report[m][key], float) else f"{report[m][key]:>16}" for m in modes)
        print(f"{key:<28}" + "".join(cells))
    for q in ("p50", "p95", "p99"):
        print(f"{'server latency ' + q + ' ms':<28}" + "".join(f"{report[m]['server_latency_ms'][q]:>16.3f}" for m in modes))
        print(f"{'client latency ' + q + ' ms':<28}" + "".join(f"{report[m]['latency_ms'][q]:>16.3f}" for m in modes))
    for d in report[modes[0]]["card_precision_at_100_per_day"]:
        print(f"{'CP@100 ' + str(d):<28}" + "".join(f"{report[m]['card_precision_at_100_per_day'][d]:>16.3f}" for m in modes))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
