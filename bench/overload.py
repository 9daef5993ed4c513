"""The overload curve: open-loop offered load from 0.5x to 3x of the capacity measured in the same run.

    uv run python -m bench.overload [--workers N] [--steps 0.5,1,1.5,2,2.5,3] [--seconds 8] [--deadline-ms 1000]

Against the real service (``fraudscore serve``, real Redis, a trained model, a filled cache: the
helpers of ``bench.fraudscore_svc``), traffic ``mixed`` (90 % cached customers, 10 % unseen).
First the capacity: a closed loop of 64 callers, OK answers/s. Then, per step, ``fsload`` (Go,
open loop: latency = answer - scheduled send, no coordinated omission) at ``step x capacity``
(its callers send their timeout as ``fraudscore_client`` does, unless ``--no-send-timeout``; with
``--throttle-k K`` they also throttle themselves as it does);
alongside it a Python probe sends ~25 payments/s of unseen cards (they need the model) and reads
each answer's source and decision, to count the decisions of degraded (FALLBACK) answers and the
silent approvals: a FALLBACK APPROVE (the model was skipped and the payment approved).

Per step: offered rate, OK answers/s, goodput (OK answers/s inside the budget; lower bound, from
the latency percentiles), share RESOURCE_EXHAUSTED and every other status, p50/p99 of the OK
(admitted) answers, the sources of the answers, the probe's decisions by source and the probe's
arrival-to-handler estimate (client latency - the server's own ``latency_ms``). JSON on stdout and
in ``bench/results/overload-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from bench.common import BENCH, CACHE_DIR, HANDBOOK, NCPU, log
from fraudscore_client._throttle import DEFAULT_WINDOW_S

BUDGET_MS = 100.0
RESULTS = BENCH / "results"
DECISIONS = {0: "UNSPECIFIED", 1: "APPROVE", 2: "REVIEW", 3: "DECLINE"}
SOURCE_NAMES = {0: "UNSPECIFIED", 1: "CACHE", 2: "MODEL", 3: "FALLBACK"}


def save_result(kind: str, stamp: str, out: dict) -> Path:
    """``bench/results/<kind>-<stamp>.json``, and the same JSON on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{kind}-{stamp}.json"
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    log(f"wrote {dest}")
    return dest


def start_service(workers: int, env: dict[str, str] | None = None, mode: str = "cache-first"):
    """Redis, a trained model, the cache filled as of the traffic day's eve, ``fraudscore serve``."""
    import pandas as pd

    from bench import data as D
    from bench import fraudscore_svc as S

    traffic = D.load_traffic()
    envr = S.Environment().start()
    try:
        # The registry and model live in .cache/bench/overload-env (trained once, reused by later runs).
        keep = CACHE_DIR / "overload-env"
        keep.mkdir(parents=True, exist_ok=True)
        envr.env.update(FRAUDSCORE_DATA_DIR=str(keep), FRAUDSCORE_DATABASE_URL=f"sqlite:///{keep}/fs.db")
        if not (keep / "fs.db").is_file() or not _reuse_model(envr):
            envr.train(HANDBOOK)
        envr.fill_cache(traffic.all_payments, pd.Timestamp(D.CACHE_AS_OF), traffic.payments["customer_id"])
        # Authentication off: the benchmark measures scoring, not the key lookup (online/auth.py).
        svc = S.Service(envr, mode=mode, workers=workers, env={"FRAUDSCORE_AUTH": "off", **(env or {})}).start()
    except BaseException:
        envr.stop()
        raise
    return traffic, envr, svc


def _reuse_model(envr) -> bool:
    from scoring_service import bootstrap
    from scoring_service.config import load_settings

    rec = bootstrap.registry(load_settings(database_url=envr.env["FRAUDSCORE_DATABASE_URL"])).active()
    if rec is None or not Path(rec.artifact_path).is_file():
        return False
    envr.model_version, envr.model_file = rec.version, Path(rec.artifact_path)
    log(f"reusing model {rec.version} ({rec.artifact_path})")
    return True


def requests_file(traffic, envr, mix: str, n: int, run_id: str) -> Path:
    from bench import data as D

    return D.write(CACHE_DIR / f"overload-{mix}-{run_id}.bin",
                   D.score_requests(traffic, mix, n, envr.cached_customers, run_id))


def fsload_run(svc, envr, path: Path, *, mode: str, rps: float = 0, concurrency: int = 1, seconds: float,
               warmup: float, offset: int, deadline_s: float, throttle_k: float = 0.0, send_timeout: bool = True,
               throttle_window_s: float = DEFAULT_WINDOW_S) -> dict:
    from bench import fraudscore_svc as S
    from bench.loadgen import run_fsload

    return run_fsload(addr=svc.address, method=S.METHOD, data=path, mode=mode, server_pids=svc.pids(),
                      concurrency=concurrency, rps=rps, duration=seconds, warmup=warmup, conns=32, offset=offset,
                      enum_field=S.SOURCE_FIELD, flag_field=S.DEGRADED_FIELD, timeout=deadline_s,
                      extra_pids={"redis": [envr.redis.proc.pid]}, throttle_k=throttle_k, send_timeout=send_timeout,
                      throttle_window_s=throttle_window_s)


def measure_capacity(svc, envr, traffic, run_id: str, deadline_s: float) -> tuple[float, dict]:
    """OK answers/s of closed loops of 16 and of 64 callers (the better one): with 64, calls also queue
    past the queueing bound and some are refused, so 16 can answer more."""
    path = requests_file(traffic, envr, "mixed", 60_000, run_id + "cap")
    runs = {c: fsload_run(svc, envr, path, mode="closed", concurrency=c, seconds=5, warmup=1, offset=i * 30_000,
                          deadline_s=deadline_s) for i, c in enumerate((16, 64))}
    best = max(runs, key=lambda c: runs[c]["achieved_rps"])
    path.unlink(missing_ok=True)
    return runs[best]["achieved_rps"], {f"closed_c{c}": {"ok_rps": round(r["achieved_rps"], 1), "codes": r["codes"],
                                                         "p99_ms": r["latency_ms"].get("p99")} for c, r in runs.items()}


def within_budget_share(latency: dict, budget_ms: float = BUDGET_MS) -> float:
    """A lower bound of the share of OK answers inside the budget, from fsload's percentiles."""
    if not latency.get("n"):
        return 0.0
    share = 0.0
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99"), (0.999, "p999"), (1.0, "max")):
        if latency[key] <= budget_ms:
            share = q
    return share


class Probe(threading.Thread):
    """~``rate`` unseen-card payments a second through real gRPC; records source, decision, latencies."""

    def __init__(self, address: str, traffic, rate: float, deadline_s: float, tag: str) -> None:
        super().__init__(daemon=True)
        self.address, self.traffic, self.rate, self.deadline_s, self.tag = address, traffic, rate, deadline_s, tag
        self.stop_flag = threading.Event()
        self.rows: list[dict] = []

    def run(self) -> None:
        import grpc

        from fraudscore_client import TIMEOUT_HEADER
        from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

        p = self.traffic.payments
        timeout_md = ((TIMEOUT_HEADER, f"{self.deadline_s * 1000:.1f}"),)  # as fraudscore_client sends it
        with grpc.insecure_channel(self.address) as ch:
            stub = scoring_pb2_grpc.FraudScoringStub(ch)
            i, t0 = 0, time.monotonic()
            while not self.stop_flag.is_set():
                due = t0 + i / self.rate
                if (pause := due - time.monotonic()) > 0:
                    time.sleep(pause)
                j = (i * 7919) % len(p)
                req = scoring_pb2.ScoreRequest(request_id=f"probe-{self.tag}-{i}")
                t = req.transaction
                t.transaction_id, t.customer_id = f"probe-{self.tag}-{i}", f"probe-{self.tag}-{i}"
                t.terminal_id, t.amount, t.currency = str(p["terminal_id"].iat[j]), float(p["amount"].iat[j]), "EUR"
                t.timestamp.FromDatetime(p["timestamp"].iat[j].to_pydatetime())
                row: dict = {"amount": t.amount, "sent": time.monotonic()}
                stub.Score.future(req, timeout=self.deadline_s, metadata=timeout_md).add_done_callback(
                    lambda fut, row=row: self._record(fut, row))  # open loop: never waits for an answer
                i += 1
            deadline = time.monotonic() + self.deadline_s + 1
            while len(self.rows) < i and time.monotonic() < deadline:
                time.sleep(0.05)

    def _record(self, fut, row: dict) -> None:
        row["client_ms"] = (time.monotonic() - row["sent"]) * 1000
        exc = fut.exception()
        if exc is None:
            r = fut.result()
            row.update(code="OK", source=SOURCE_NAMES.get(r.source, "?"), decision=DECISIONS.get(r.decision, "?"),
                       server_ms=r.latency_ms)
        else:
            row.update(code=exc.code().name)
        self.rows.append(row)

    def summary(self) -> dict:
        import numpy as np

        ok = [r for r in self.rows if r["code"] == "OK"]
        by_source: dict[str, dict[str, int]] = {}
        for r in ok:
            d = by_source.setdefault(r["source"], {})
            d[r["decision"]] = d.get(r["decision"], 0) + 1
        codes: dict[str, int] = {}
        for r in self.rows:
            codes[r["code"]] = codes.get(r["code"], 0) + 1
        outside = np.array([r["client_ms"] - r["server_ms"] for r in ok]) if ok else np.array([0.0])
        return {"sent": len(self.rows), "codes": codes, "decisions_by_source": by_source,
                "silent_approvals": sum(1 for r in ok if r["source"] == "FALLBACK" and r["decision"] == "APPROVE"),
                "fallback_approve_above_100": sum(1 for r in ok if r["source"] == "FALLBACK"
                                                  and r["decision"] == "APPROVE" and r["amount"] > 100),
                "outside_handler_ms": {"p50": float(np.percentile(outside, 50)),
                                       "p99": float(np.percentile(outside, 99))}}


def step_row(mult: float, target: float, res: dict, probe: dict) -> dict:
    measured = max(res["requests_measured"], 1)
    codes = res["codes"]
    share = within_budget_share(res["latency_ms"])
    sources = {SOURCE_NAMES.get(int(k), k): v for k, v in res.get("enum_counts", {}).items()}
    return {
        "load_x": mult, "offered_rps": round(target, 1), "ok_rps": round(res["achieved_rps"], 1),
        "goodput_rps": round(res["achieved_rps"] * share, 1), "ok_within_budget_share_lb": share,
        "resource_exhausted_share": round(codes.get("ResourceExhausted", 0) / measured, 4),
        "deadline_exceeded_share": round(codes.get("DeadlineExceeded", 0) / measured, 4),
        "throttled_locally_share": round(codes.get("ThrottledLocally", 0) / measured, 4),
        "codes": codes, "client_dropped": res.get("client_dropped", 0),
        "admitted_p50_ms": res["latency_ms"].get("p50"), "admitted_p99_ms": res["latency_ms"].get("p99"),
        "admitted_max_ms": res["latency_ms"].get("max"), "sources": sources,
        "degraded": res.get("flag_count", 0), "server_cpu_s_per_1k": round(res["server_cpu_s_per_1k"], 3),
        "probe": probe,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=NCPU)
    ap.add_argument("--steps", default="0.5,1,1.5,2,2.5,3")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--deadline-ms", type=float, default=1000.0, help="the callers' deadline (fsload and probe)")
    ap.add_argument("--probe-rate", type=float, default=25.0)
    ap.add_argument("--service-env", nargs="*", default=[], help="settings of the service, K=V (FRAUDSCORE_...)")
    ap.add_argument("--throttle-k", type=float, default=0.0,
                    help="the load's callers throttle themselves as fraudscore_client does, with this k (0: raw load)")
    ap.add_argument("--throttle-window", type=int, default=round(DEFAULT_WINDOW_S),
                    help="the throttle's window, s (fraudscore_client's window_s)")
    ap.add_argument("--no-send-timeout", action="store_true",
                    help="the load's callers do not send x-fraudscore-timeout-ms (callers not using fraudscore_client)")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.service_env)
    steps = [float(s) for s in args.steps.split(",") if s]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    run_id = f"ov{stamp}"
    deadline_s = args.deadline_ms / 1000
    traffic, envr, svc = start_service(args.workers, env)
    out: dict = {"bench": "overload", "stamp": stamp, "note": args.note, "budget_ms": BUDGET_MS,
                 "throttle_k": args.throttle_k, "throttle_window_s": args.throttle_window,
                 "send_timeout": not args.no_send_timeout,
                 "deadline_ms": args.deadline_ms, "server": svc.describe(), "mix": "mixed", "steps": []}
    try:
        capacity, out["capacity"] = measure_capacity(svc, envr, traffic, run_id, deadline_s)
        out["capacity"]["ok_rps"] = round(capacity, 1)
        log(f"capacity {capacity:.0f}/s ({out['capacity']})")
        per_step = [int(m * capacity * (args.seconds + args.warmup) * 1.1) + 1000 for m in steps]
        path = requests_file(traffic, envr, "mixed", sum(per_step), run_id)
        offset = 0
        for mult, n in zip(steps, per_step, strict=True):
            target = mult * capacity
            probe = Probe(svc.address, traffic, args.probe_rate, deadline_s, f"{run_id}-{mult}")
            probe.start()
            res = fsload_run(svc, envr, path, mode="open", rps=target, seconds=args.seconds, warmup=args.warmup,
                             offset=offset, deadline_s=deadline_s, throttle_k=args.throttle_k,
                             send_timeout=not args.no_send_timeout, throttle_window_s=args.throttle_window)
            probe.stop_flag.set()
            probe.join(timeout=5)
            offset += n
            row = step_row(mult, target, res, probe.summary())
            out["steps"].append(row)
            log(f"{mult}x {target:.0f}/s: ok {row['ok_rps']}/s goodput {row['goodput_rps']}/s "
                f"RE {row['resource_exhausted_share']:.1%} p99 {row['admitted_p99_ms']} ms "
                f"silent {row['probe']['silent_approvals']} codes {row['codes']}")
            time.sleep(1.0)
    finally:
        svc.stop()
        envr.stop()
    peak = max((s["goodput_rps"] for s in out["steps"]), default=0.0)
    last = out["steps"][-1] if out["steps"] else {}
    out["summary"] = {
        "peak_goodput_rps": peak,
        "goodput_at_max_load_vs_peak": round(last.get("goodput_rps", 0) / peak, 3) if peak else None,
        "max_admitted_p99_ms": max((s["admitted_p99_ms"] or 0 for s in out["steps"]), default=None),
        "silent_approvals": sum(s["probe"]["silent_approvals"] for s in out["steps"]),
    }
    save_result("overload", stamp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
