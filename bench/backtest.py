"""Backtest: the handbook's test week replayed through the live service, cache-first vs always-model.

One command: ``uv run python -m bench.backtest [--days 7] [--concurrency 8]``. It starts a real
Redis and a real Kafka broker, trains the model on the handbook protocol (``fraudscore train``),
publishes the whole handbook file to Kafka (``fraudscore events publish``), then for each mode
starts ``fraudscore serve --mode M`` and, for each test day D, runs the real nightly job as of D
00:00 (``fraudscore nightly --as-of D``: features from Kafka, new cache generation, atomic switch)
and sends day D's payments as Score() calls. The answers are joined with the labels: served
average precision, Card Precision@100 per day, cache hit ratio and latency percentiles, as JSON
(``bench/results/backtest-<time>.json``) and a table.

Options (none given: the run above, unchanged):

* ``--data PATH``: any payments file (handbook columns or the normalised frame) instead of the handbook.
* ``--simulated [--sim-seed N] [--card-testing-per-day X]``: payments from
  ``scoring_service.training.simulator.simulate`` (5,000 cards, 10,000 terminals, 2018-04-01 + 137
  days: the handbook protocol's dates), written to a Parquet file in the work folder.
* ``--cohort-share S --cohort-seed N`` (either one turns it on; share 0.2, seed 0 by default): a
  cold-start cohort. A seeded share S of the cards that pay in the replayed days gets a new
  customer id (``new-<id>``, the same every day) in the Score() traffic only (Kafka, hence the
  nightly job, has the old id): their first payment reaches the model as an unseen card, their later
  ones whatever the service keeps for them. Served AP and CP@100 are reported per mode for the
  cohort and for the rest (``cohort``/``rest`` in the JSON), next to the overall figures.
* When the data has ``TX_FRAUD_SCENARIO`` (4 = card testing), the column is kept out of what the
  service sees (train and publish read a copy without it) and the card-testing detection rate is
  reported per mode (``card_testing`` in the JSON, ``bench/backtest_report.detection_summary``).
* ``--floors REVIEW,APPROVE``: the values of ``FRAUDSCORE_FALLBACK_MIN_DECISION`` to run, one scorer
  process each (default: the service's own, the run above).
* ``--redis-outage HH:MM-HH:MM``: each replayed day's payments are sent in three parts, before /
  during / after that window of event time, and around the "during" part the real Redis is frozen
  (SIGSTOP, then SIGCONT in a ``finally``: a hung Redis, reads time out at FRAUDSCORE_REDIS_TIMEOUT_MS);
  the "after" part waits for the breaker's reset. One such run per floor, then the normal run (Redis
  up, the service's floor) as the baseline for the same hours. ``outage`` in the JSON: per mode and
  run, what the answers in the window decided (``bench/backtest_report.decision_counts``: frauds
  passed, genuine payments stopped, sources, reason codes, which Score() answers carry and this run
  records).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd

from bench.backtest_report import (
    NEW_PREFIX,
    SCENARIO_COLUMN,
    attach_scenarios,
    choose_cohort,
    cohort_summaries,
    decision_counts,
    detection_summary,
    in_window,
    parse_window,
    rename_cohort,
    scenarios_by_transaction,
    scored_frame,
    split_day,
)
from scoring_service.adapters.files.payments_file import read_payments_file
from scoring_service.batch.replay import _drive, summarise
from tests.conftest import handbook_path
from tests.servers.kafka import KafkaServer
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess

REPO = Path(__file__).resolve().parent.parent
TEST_START = pd.Timestamp("2018-08-08")
FLOORS = ("APPROVE", "REVIEW", "DECLINE")
REDIS_UP = "redis up"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "scoring_service.cli", *args], cwd=REPO, env=env, check=True,
                              capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        print(f"fraudscore {' '.join(args)} failed ({exc.returncode}):\n{(exc.stderr or '')[-4000:]}", file=sys.stderr)
        raise


def simulated_file(work: Path, seed: int, card_testing_per_day: float | None) -> Path:
    """Simulated payments over the handbook protocol's dates, as a Parquet file in ``work``."""
    from scoring_service.training.simulator import simulate

    kwargs: dict = {}
    if card_testing_per_day is not None:
        if "card_testing_per_day" not in inspect.signature(simulate).parameters:
            sys.exit("--card-testing-per-day: this simulator has no card_testing_per_day")
        kwargs["card_testing_per_day"] = card_testing_per_day
    frame = simulate(n_customers=5000, n_terminals=10000, start_date="2018-04-01", n_days=137, seed=seed, **kwargs)
    path = work / f"simulated-seed{seed}.parquet"
    frame.to_parquet(path, index=False)
    return path


def service_file(data: Path, work: Path) -> tuple[Path, pd.Series | None]:
    """The file the service is trained on and fed from (``data`` without TX_FRAUD_SCENARIO, a label
    it must not see), and the scenario of each transaction id when ``data`` has that column."""
    import pyarrow.parquet as pq

    if SCENARIO_COLUMN not in pq.read_schema(data).names:
        return data, None
    raw = pd.read_parquet(data)
    scenarios = scenarios_by_transaction(raw)
    path = work / f"service-{data.stem}.parquet"
    raw.drop(columns=[SCENARIO_COLUMN]).to_parquet(path, index=False)
    return path, scenarios


class ReasonRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Keeps each Score() answer's reason codes by request id (``_drive``'s answers carry none)."""

    def __init__(self) -> None:
        self.codes: dict[str, tuple[str, ...]] = {}

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError:
            return call  # the caller sees the error
        self.codes[request.request_id] = tuple(r.code for r in response.reasons)
        return call

    def channel(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, interceptors=[self])


class RedisFrozen:
    """The real Redis stopped (SIGSTOP) for the ``with`` block, always resumed (SIGCONT), then ``settle_s``
    for the scorer's breaker to reset; ``seconds``: how long it was stopped, each time."""

    def __init__(self, redis: RedisServer, settle_s: float) -> None:
        self.redis, self.settle_s, self.seconds = redis, settle_s, []

    def __enter__(self) -> None:
        self.redis.pause()
        self._t = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.redis.resume()
        self.seconds.append(round(time.monotonic() - self._t, 2))
        time.sleep(self.settle_s)


def planned_runs(mode: str, floors: list[str | None], outage: bool) -> list[tuple[str, str, str | None, bool]]:
    """(report key, label, floor (None: the service's own), Redis frozen in the window) of each run of ``mode``.

    No options: one run, ``mode``. With an outage: one outage run per floor, then the normal run
    (key ``mode``) as the baseline, last so that no earlier run of the mode recorded the window's payments in Redis."""
    def label(floor: str | None) -> str:
        return ("outage " if outage else "") + (f"floor {floor}" if floor else "floor default")

    if not outage:
        return [(mode, label(None), None, False)] if floors == [None] else [(f"{mode} {label(f)}", label(f), f, False)
                                                                             for f in floors]
    return [(f"{mode} {label(f)}", label(f), f, True) for f in floors] + [(mode, REDIS_UP, None, False)]


def replay_part(address: str, part: pd.DataFrame, concurrency: int, recorder: ReasonRecorder | None,
                in_outage: bool) -> list[dict[str, Any]]:
    """``part``'s Score() answers (``_drive``), with their reason codes and outage tag when ``recorder`` is given."""
    answers = asyncio.run(_drive(address, part, 0.0, concurrency, 2.0, None,
                                 open_channel=recorder.channel if recorder else None))
    if recorder is not None:
        for tx, a in zip(part["transaction_id"].tolist(), answers, strict=True):
            a["reasons"] = recorder.codes.pop(f"replay-{tx}", ())
            a["outage"] = in_outage
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--modes", default="cache-first,always-model")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=None, help="payments Parquet file (default: the handbook)")
    src.add_argument("--simulated", action="store_true", help="simulated payments (simulator, 137 days from 2018-04-01)")
    ap.add_argument("--sim-seed", type=int, default=0, help="simulator seed (--simulated)")
    ap.add_argument("--card-testing-per-day", type=float, default=None,
                    help="simulator's card_testing_per_day (--simulated; default: the simulator's)")
    ap.add_argument("--cohort-share", type=float, default=None, help="cold-start cohort: share of the replayed cards (0.2)")
    ap.add_argument("--cohort-seed", type=int, default=None, help="cold-start cohort: seed (0)")
    ap.add_argument("--floors", default=None, help="FRAUDSCORE_FALLBACK_MIN_DECISION values, one run each (REVIEW,APPROVE)")
    ap.add_argument("--redis-outage", default=None, metavar="HH:MM-HH:MM",
                    help="Redis frozen (SIGSTOP) while each day's payments of this event-time window are sent")
    args = ap.parse_args()
    floors: list[str | None] = [None] if args.floors is None else [f.strip().upper() for f in args.floors.split(",")]
    if any(f not in FLOORS for f in floors):
        sys.exit(f"--floors: each one of {', '.join(FLOORS)}")
    try:
        window = parse_window(args.redis_outage) if args.redis_outage else None
    except ValueError as exc:
        sys.exit(f"--redis-outage: {exc}")
    cohort_on = args.cohort_share is not None or args.cohort_seed is not None
    share = 0.2 if args.cohort_share is None else args.cohort_share
    cohort_seed = 0 if args.cohort_seed is None else args.cohort_seed
    if not 0.0 <= share <= 1.0:
        sys.exit("--cohort-share must be in [0, 1]")
    if args.simulated:
        data = None
    elif args.data is not None:
        if not args.data.is_file():
            sys.exit(f"--data: no such file {args.data}")
        data = args.data.resolve()
    else:
        data = handbook_path()
        if data is None:
            sys.exit("the handbook file is needed (set FRAUDSCORE_HANDBOOK)")
    work = Path(tempfile.mkdtemp(prefix="fs-backtest-"))
    redis, kafka = RedisServer().start(), KafkaServer().start()
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(work), "REDIS_URL": redis.url,
           "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "FRAUDSCORE_LOG_FORMAT": "json", "OMP_WAIT_POLICY": "PASSIVE",
           "FRAUDSCORE_AUTH": "off",  # the replay client sends no key (bench/security_cost.py measures keys)
           "FRAUDSCORE_CLOCK": "event"}  # a replay of history: the events' own times, explicitly
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report: dict = {"machine": os.uname().nodename, "cores": os.cpu_count(), "started": started}
    scenarios: pd.Series | None = None
    try:
        if args.simulated:
            t = time.monotonic()
            data = simulated_file(work, args.sim_seed, args.card_testing_per_day)
            report["simulated"] = {"seed": args.sim_seed, "card_testing_per_day": args.card_testing_per_day,
                                   "file": str(data), "seconds": round(time.monotonic() - t, 1)}
        assert data is not None
        report["data"] = str(data)
        data, scenarios = service_file(data, work)
        report["card_testing_labels"] = scenarios is not None
        t = time.monotonic()
        report["train"] = json.loads(cli(env, "train", "--data", str(data)).stdout.strip().splitlines()[-1])
        report["train"]["seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        cli(env, "events", "publish", "--parquet", str(data))
        report["publish_seconds"] = round(time.monotonic() - t, 1)
        payments = read_payments_file(data)
        days = [TEST_START + pd.Timedelta(days=i) for i in range(args.days)]
        cohort: set[str] = set()
        if cohort_on:
            replayed = payments[(payments["timestamp"] >= days[0]) & (payments["timestamp"] < days[-1] + pd.Timedelta(days=1))]
            cohort = choose_cohort(replayed["customer_id"], share, cohort_seed)
            report["cohort"] = {"share": share, "seed": cohort_seed, "cards": len(cohort),
                                "replayed_cards": int(replayed["customer_id"].nunique()), "new_id": f"{NEW_PREFIX}<id>"}
        # after SIGCONT, wait for the breaker's reset before the "after" part, as a real clock would
        frozen = RedisFrozen(redis, float(os.environ.get("FRAUDSCORE_BREAKER_RESET_S", "2.0")) + 1.0)
        recorder = ReasonRecorder() if window else None
        if window:
            report["outage"] = {"window": args.redis_outage, "days": len(days), "runs": {}}
        for mode in args.modes.split(","):
            for key, label, floor, stop_redis in planned_runs(mode, floors, window is not None):
                env_floor = {"FRAUDSCORE_FALLBACK_MIN_DECISION": floor} if floor else {}
                scorer = ScorerProcess(work, redis.url, env={"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
                                                             "FRAUDSCORE_LOG_REQUESTS": "false", **env_floor},
                                       args=["--mode", mode]).start()
                frames, answers, nightly = [], [], []
                frozen.seconds = []
                t_run = time.monotonic()
                try:
                    for day in days:
                        t = time.monotonic()
                        run = json.loads(cli(env, "nightly", "--as-of", day.isoformat(), "--json").stdout)
                        nightly.append({"as_of": day.isoformat(), "seconds": round(time.monotonic() - t, 1),
                                        "entities": run.get("entities_scored"), "keys": run.get("keys_written")})
                        time.sleep(1.5)  # the service re-reads the active generation every second
                        todays = payments[(payments["timestamp"] >= day) & (payments["timestamp"] < day + pd.Timedelta(days=1))]
                        parts = split_day(todays, day, window) if stop_redis and window else (todays,)
                        for i, part in enumerate(parts):
                            in_outage = len(parts) == 3 and i == 1  # before / during / after
                            sent = rename_cohort(part, cohort) if cohort_on else part
                            with frozen if in_outage else nullcontext():
                                answers += replay_part(scorer.address, sent, args.concurrency, recorder, in_outage)
                            frames.append(part)
                        print(f"{key} {day.date()}: {len(todays)} payments", flush=True)
                finally:
                    scorer.stop()
                replayed_frame = pd.concat(frames, ignore_index=True)
                summary = summarise(replayed_frame, answers)
                summary["nightly_runs"] = nightly
                summary["floor"] = floor or "service default"
                summary["seconds"] = round(time.monotonic() - t_run, 1)
                if cohort_on or scenarios is not None or window:
                    scored = scored_frame(replayed_frame, answers)  # original customer ids
                    if cohort_on:
                        summary.update(cohort_summaries(scored, scored["customer_id"].isin(cohort)))
                    if scenarios is not None:
                        summary["card_testing"] = detection_summary(scored, attach_scenarios(scored, scenarios))
                    if window:
                        # the answers given while Redis was frozen; the baseline: the same hours, Redis up
                        hours = (np.array([a.get("outage", False) for a in answers]) if stop_redis
                                 else in_window(scored["timestamp"], window))
                        counts = decision_counts(scored[hours])
                        if stop_redis:
                            summary["redis_stopped_s"] = list(frozen.seconds)
                            counts["redis_stopped_s"] = round(sum(frozen.seconds), 1)
                        report["outage"]["runs"].setdefault(mode, {})[label] = counts
                report[key] = summary
    finally:
        kafka.stop()
        redis.stop()
    out = REPO / "bench" / "results" / f"backtest-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    modes = [k for m in args.modes.split(",") for k, *_ in planned_runs(m, floors, window is not None) if k in report]
    w = max(16, *(len(m) + 2 for m in modes))
    print(f"\n{'metric':<28}" + "".join(f"{m:>{w}}" for m in modes))
    for key in ("requests", "errors", "degraded", "average_precision", "card_precision_at_100", "cache_hit_ratio"):
        cells = (f"{report[m][key]:>{w}.4f}" if isinstance(report[m][key], float) else f"{report[m][key]:>{w}}" for m in modes)
        print(f"{key:<28}" + "".join(cells))
    for q in ("p50", "p95", "p99"):
        print(f"{'server latency ' + q + ' ms':<28}" + "".join(f"{report[m]['server_latency_ms'][q]:>{w}.3f}" for m in modes))
        print(f"{'client latency ' + q + ' ms':<28}" + "".join(f"{report[m]['latency_ms'][q]:>{w}.3f}" for m in modes))
    for d in report[modes[0]]["card_precision_at_100_per_day"]:
        print(f"{'CP@100 ' + str(d):<28}" + "".join(f"{report[m]['card_precision_at_100_per_day'][d]:>{w}.3f}" for m in modes))
    if cohort_on:
        print(f"\ncold-start cohort: {report['cohort']['cards']} of {report['cohort']['replayed_cards']} cards "
              f"(share {share}, seed {cohort_seed})")
        for group in ("cohort", "rest"):
            for key, label in (("requests", "payments"), ("cards", "cards"), ("frauds", "frauds"),
                               ("average_precision", "AP"), ("card_precision_at_100", "CP@100"),
                               ("card_precision_at_100_ceiling", "CP@100 ceiling"), ("cache_hit_ratio", "cache hit ratio"),
                               ("decline_ratio", "decline ratio")):
                cells = (f"{report[m][group][key]:>{w}.4f}" if isinstance(report[m][group][key], float)
                         else f"{report[m][group][key]:>{w}}" for m in modes)
                print(f"{group + ' ' + label:<28}" + "".join(cells))
    if scenarios is not None:
        print("\ncard testing (TX_FRAUD_SCENARIO 4)")
        for key in ("cards", "cards_with_large_in_replay", "declined_before_large", "declined_at_or_before_large",
                    "large_declined_share", "small_declined_share"):
            cells = (f"{report[m]['card_testing'][key]:>{w}.4f}" if isinstance(report[m]["card_testing"][key], float)
                     else f"{report[m]['card_testing'][key]:>{w}}" for m in modes)
            print(f"{key:<28}" + "".join(cells))
    if window:
        print(f"\nRedis frozen {args.redis_outage} (event time) on each of {len(days)} days: the answers in that window")
        cols = ("payments", "frauds", "frauds_passed", "frauds_stopped", "genuine", "genuine_stopped", "errors", "degraded")
        for mode, runs in report["outage"]["runs"].items():
            print(f"{mode:<24}" + "".join(f"{c:>16}" for c in cols))
            for label, counts in runs.items():
                print(f"{label:<24}" + "".join(f"{counts[c]:>16}" for c in cols))
            for label, counts in runs.items():
                print(f"  {label}: sources {counts['sources']}, decisions {counts['decisions']}")
                print(f"  {label}: reasons {dict(list(counts['reasons'].items())[:6])}")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
