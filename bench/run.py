"""One command for the benchmark: ``uv run python -m bench.run [--quick]``.

Starts real servers on loopback (Redis + ``fraudscore serve``; MLServer from its own venv),
drives them from a separate load-generator process (bench/loadgen, Go) over gRPC, and writes
``bench/results/<timestamp>.json`` plus a table. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np

from bench import data as D
from bench.common import BENCH, CACHE_DIR, HANDBOOK, NCPU, log
from bench.loadgen import run_fsload

RESULTS = BENCH / "results"
MIXES = ("hits", "mixed", "unseen")
CEILING = "grpc.aio constant (ceiling)"


def pinning(kind: str) -> tuple[str | None, str | None]:
    """(loadgen cpus, server cpus)."""
    if NCPU < 2 or kind == "none":
        return None, None
    last = str(NCPU - 1)
    if kind == "split":
        return last, ",".join(str(i) for i in range(NCPU - 1))
    return last, None  # "loadgen": the loader on the last core, the servers anywhere


class Plan:
    def __init__(self, quick: bool):
        self.quick = quick
        self.concurrency = (1, 8, 64)
        self.closed_s, self.closed_warm = (3.0, 1.0) if quick else (8.0, 2.0)
        self.open_s, self.open_warm = (3.0, 1.0) if quick else (6.0, 1.0)
        self.open_fractions = (0.5, 0.9, 1.2) if quick else (0.25, 0.5, 0.75, 0.9, 1.0, 1.2)
        self.rows = 60_000 if quick else 200_000
        # SO_REUSEPORT hands each connection to one worker by a hash of its addresses: 8 connections
        # split 5/3 or 6/2 between 2 workers (seen with ss), so one worker queued at half the load.
        # 32 connections split close to evenly; the reference gets the same.
        self.conns = 32


def scenario(name: str, server_desc: dict, *, addr: str, method: str, data: Path, pids: list[int], plan: Plan,
             lg_cpus: str | None, offset: list[int], extra_pids=None, fields=(0, 0)) -> dict:
    """Closed loop at 1/8/64, then an open-loop step series from the closed-loop peak up to saturation."""
    runs = []

    def one(**kw):
        r = run_fsload(addr=addr, method=method, data=data, server_pids=pids, cpus=lg_cpus, offset=offset[0],
                       extra_pids=extra_pids, enum_field=fields[0], flag_field=fields[1], **kw)
        offset[0] += r["data_used"]
        r["scenario"] = name
        runs.append(r)
        _line(r)
        return r

    for c in plan.concurrency:
        one(mode="closed", concurrency=c, conns=min(c, plan.conns), duration=plan.closed_s, warmup=plan.closed_warm)
    peak = max(r["achieved_rps"] for r in runs)
    for f in plan.open_fractions:
        rate = max(10.0, round(peak * f, -1))
        r = one(mode="open", rps=rate, conns=plan.conns, duration=plan.open_s, warmup=plan.open_warm)
        if r["achieved_rps"] < 0.9 * rate or r["latency_ms"].get("p99", 0) > 1000:
            r["saturated"] = True
            break
    return {"name": name, "server": server_desc, "peak_closed_rps": peak, "runs": runs}


def _fmt(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:,.{nd}f}"


def _line(r: dict) -> None:
    lat = r["latency_ms"]
    shape = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target_rps']:.0f}/s"
    log(f"  {r['scenario']:<28} {r['mode']:<6} {shape:>8}  {r['achieved_rps']:8.0f} rps  p50 {_fmt(lat.get('p50'), 2)}"
        f"  p99 {_fmt(lat.get('p99'), 2)} ms  err {r['errors']}  cpu/1k {r['server_cpu_s_per_1k']:.3f}s")


def table(results: dict) -> str:
    hdr = ("scenario", "load", "rps", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "err", "rej", "srv cpu s/1k",
           "redis s/1k", "lg s/1k", "sources")
    rows = []
    for sc in results["scenarios"]:
        for r in sc["runs"]:
            lat = r["latency_ms"]
            codes = r.get("codes", {})
            rej = sum(v for k, v in codes.items() if k in ("ResourceExhausted", "Unavailable")) + r.get("client_dropped", 0)
            src = r.get("enum_counts")
            from bench.fraudscore_svc import SOURCES

            srcs = ",".join(f"{SOURCES.get(k, k)}:{v}" for k, v in sorted(src.items())) if src else ""
            if r.get("flag_count"):
                srcs += f" degraded:{r['flag_count']}"
            load = f"closed c={r['concurrency']}" if r["mode"] == "closed" else f"open {r['target_rps']:.0f}/s" + (
                " SAT" if r.get("saturated") else "")
            rows.append((sc["name"], load, _fmt(r["achieved_rps"], 0), _fmt(lat.get("p50"), 2), _fmt(lat.get("p95"), 2),
                         _fmt(lat.get("p99"), 2), _fmt(lat.get("p999"), 2), str(r["errors"]), str(rej),
                         _fmt(r["server_cpu_s_per_1k"], 3), _fmt(r.get("redis_cpu_s_per_1k"), 3),
                         _fmt(r["loadgen_cpu_s_per_1k"], 3), srcs))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    out = [" | ".join(h.ljust(w) for h, w in zip(hdr, widths, strict=True)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def _closed_cpu(sc: dict, concurrency: int = 8) -> float | None:
    """Server CPU seconds per 1,000 requests of ``sc``'s closed-loop run at ``concurrency`` in flight."""
    return next((r["server_cpu_s_per_1k"] for r in sc["runs"] if r["mode"] == "closed" and r["concurrency"] == concurrency
                 and r["server_cpu_s_per_1k"]), None)


def ratios(results: dict) -> dict:
    """The run's figures against each other (same machine, same run): every fraudscore scenario's server CPU
    per request over the ceiling's (closed loop, 8 in flight: the load of the guard in ``make test``,
    tests/e2e/test_cost_guard.py), and new cards (cache-first unseen) against the best MLServer config."""
    out: dict = {}
    scenarios = {sc["name"]: sc for sc in results["scenarios"]}
    ceiling = _closed_cpu(scenarios[CEILING]) if CEILING in scenarios else None
    if ceiling:
        out["cpu_per_request_vs_ceiling_c8"] = {
            name: round(cpu / ceiling, 2) for name, sc in scenarios.items()
            if name.startswith("fraudscore") and (cpu := _closed_cpu(sc))}
    new = [sc for name, sc in scenarios.items() if name.startswith("fraudscore cache-first unseen")]
    refs = [sc for name, sc in scenarios.items() if name.startswith("mlserver") and sc["peak_closed_rps"]]
    if new and refs:
        ours, ref = new[-1], max(refs, key=lambda sc: sc["peak_closed_rps"])
        cpu_ours, cpu_ref = _closed_cpu(ours), _closed_cpu(ref)
        out["new_cards_vs_mlserver"] = {
            "ours": ours["name"], "reference": ref["name"],
            "peak_rps": round(ours["peak_closed_rps"] / ref["peak_closed_rps"], 2),
            "reference_cpu_per_request_over_ours_c8": round(cpu_ref / cpu_ours, 2) if cpu_ours and cpu_ref else None}
    return out


def ratios_summary(r: dict) -> str:
    lines = ["ratios (this run):"]
    for name, x in r.get("cpu_per_request_vs_ceiling_c8", {}).items():
        lines.append(f"  server CPU per request, {name} / ceiling (c=8): {x:.2f}x")
    if (m := r.get("new_cards_vs_mlserver")):
        cpu = m["reference_cpu_per_request_over_ours_c8"]
        lines.append(f"  new cards ({m['ours']}) vs {m['reference']}: peak rps {m['peak_rps']:.2f}x theirs; their "
                     f"server CPU per request (c=8) {'-' if cpu is None else f'{cpu:.2f}x'} ours")
    return "\n".join(lines) if len(lines) > 1 else "ratios: none (a part is missing from this run)"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return {"host": platform.node(), "cpu": cpu, "cores": NCPU, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": load}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=BENCH).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (~3 min): smoke use")
    ap.add_argument("--only", choices=("all", "ours", "mlserver"), default="all")
    ap.add_argument("--mixes", default=",".join(MIXES), help="Score() traffic mixes for cache-first")
    ap.add_argument("--workers", type=int, default=NCPU, help="fraudscore serve --workers")
    ap.add_argument("--pin", choices=("loadgen", "split", "none"), default="loadgen",
                    help="loadgen: loader on the last core, servers anywhere; split: servers on the other cores; none")
    ap.add_argument("--mlserver-configs", default="mlserver,mlserver-batch")
    ap.add_argument("--throwaway-model", action="store_true", help="MLServer serves a model trained here, not fraudscore's")
    ap.add_argument("--note", default="", help="free text kept in the JSON (what changed)")
    ap.add_argument("--intraday-ab", action="store_true",
                    help="cache-first mixes twice in this run: FRAUDSCORE_INTRADAY=false, then true (its cost on the hot path)")
    args = ap.parse_args(argv)
    plan = Plan(args.quick)
    lg_cpus, srv_cpus = pinning(args.pin)
    started = dt.datetime.now()
    run_id = started.strftime("%Y%m%dT%H%M%S")
    results = {"started": started.isoformat(timespec="seconds"), "git": git_rev(), "machine": machine(),
               "quick": args.quick, "note": args.note, "pinning": {"mode": args.pin, "loadgen": lg_cpus or "all",
                                                                   "servers": srv_cpus or "all"},
               "plan": vars(plan), "scenarios": [], "failures": []}
    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)

    log("loading traffic + features")
    traffic = D.load_traffic()
    results["traffic"] = {"source": traffic.source, "day": D.TRAFFIC_DAY, "rows": len(traffic.payments),
                          "cache_as_of": D.CACHE_AS_OF, "features": int(traffic.features.shape[1])}
    model_file = None

    # ------------------------------------------------------------------ our service
    if args.only in ("all", "ours"):
        from bench import fraudscore_svc as S

        envr = S.Environment()
        try:
            envr.start()
            envr.train(HANDBOOK)
            # MLServer runs after our part, whose data dir is deleted then: keep a copy of the model.
            model_file = CACHE_DIR / f"reference-model{envr.model_file.suffix}"
            shutil.copy(envr.model_file, model_file)
            import pandas as pd

            envr.fill_cache(traffic.all_payments, pd.Timestamp(D.CACHE_AS_OF), traffic.payments["customer_id"])
            results["fraudscore"] = {"model_version": envr.model_version, "model_file": str(envr.model_file),
                                     "cache_fill": envr.cache_fill, "cached_traffic_customers": len(envr.cached_customers)}
            mixes = [m for m in args.mixes.split(",") if m]
            runs = [("cache-first", m) for m in mixes] + [("always-model", "hits")]
            variants = [("", {})]
            if args.intraday_ab:
                variants = [(" intraday-off", {"FRAUDSCORE_INTRADAY": "false"}),
                            (" intraday-on", {"FRAUDSCORE_INTRADAY": "true"})]
            for mode, (label, env) in [("cache-first", v) for v in variants] + [("always-model", variants[-1])]:
                svc = S.Service(envr, mode=mode, workers=args.workers, cpus=srv_cpus, env=env).start()
                try:
                    for m in [mm for (md, mm) in runs if md == mode]:
                        # fresh unseen ids per variant: a variant must not find the other's write-backs
                        path = D.write(CACHE_DIR / f"score-{m}.bin",
                                       D.score_requests(traffic, m, plan.rows, envr.cached_customers, run_id + label.strip()))
                        results["scenarios"].append(scenario(
                            f"fraudscore {mode} {m}{label}", {**svc.describe(), "mix": m}, addr=svc.address, method=S.METHOD,
                            data=path, pids=svc.pids(), plan=plan, lg_cpus=lg_cpus, offset=[0],
                            extra_pids={"redis": [envr.redis.proc.pid]}, fields=(S.SOURCE_FIELD, S.DEGRADED_FIELD)))
                finally:
                    svc.stop()
            # The ceiling: the same contract, workers and load generator, a server that does nothing.
            from bench.grpc_ceiling import CeilingServer

            path = D.write(CACHE_DIR / "score-ceiling.bin", D.score_requests(traffic, "hits", plan.rows, None, run_id))
            ceiling = CeilingServer(workers=args.workers, cpus=srv_cpus).start()
            try:
                results["scenarios"].append(scenario(
                    CEILING, ceiling.describe(), addr=ceiling.address, method=S.METHOD, data=path,
                    pids=ceiling.pids(), plan=plan, lg_cpus=lg_cpus, offset=[0], fields=(S.SOURCE_FIELD, S.DEGRADED_FIELD)))
            finally:
                ceiling.stop()
        except Exception as exc:  # the reference still runs; the failure is reported
            log(f"fraudscore part failed: {exc}")
            results["failures"].append({"part": "fraudscore", "error": f"{type(exc).__name__}: {exc}",
                                        "trace": traceback.format_exc()[-3000:]})
        finally:
            envr.stop()

    # ------------------------------------------------------------------ shadow scoring's cost
    if args.only in ("all", "ours"):
        from bench import shadow_cost

        try:  # the answers with FRAUDSCORE_SHADOW_SHARE 0, then 1.0 (new cards: a model call each)
            results["shadow_cost"] = shadow_cost.measure(requests=1000 if args.quick else 3000, concurrency=8)
            log(shadow_cost.summary(results["shadow_cost"]))
        except Exception as exc:
            log(f"shadow cost part failed: {exc}")
            results["failures"].append({"part": "shadow_cost", "error": f"{type(exc).__name__}: {exc}",
                                        "trace": traceback.format_exc()[-3000:]})

    # ------------------------------------------------------------------ the reference
    if args.only in ("all", "mlserver"):
        from bench import mlserver_ref as M

        try:
            if model_file is None or args.throwaway_model:
                from bench.model import train_throwaway

                model_file = train_throwaway(traffic.all_payments)
                results["reference_model"] = {"kind": "throwaway (bench/model.py)", "file": str(model_file)}
            else:
                results["reference_model"] = {"kind": "fraudscore train (registry active)", "file": str(model_file)}
            py = M.ensure_venv()
            npy = CACHE_DIR / "features.npy"
            np.save(npy, traffic.features)
            infer = CACHE_DIR / "infer.bin"
            subprocess.run([str(py), str(BENCH / "_oip_requests.py"), str(npy), str(infer), M.MODEL_NAME, "predict"],
                           check=True)
            for cfg in [c for c in args.mlserver_configs.split(",") if c]:
                ms = M.MLServer(model_file, config=cfg, cpus=srv_cpus).start()
                try:
                    results["scenarios"].append(scenario(
                        cfg, ms.describe(), addr=ms.address, method="/inference.GRPCInferenceService/ModelInfer",
                        data=infer, pids=ms.pids(), plan=plan, lg_cpus=lg_cpus, offset=[0]))
                finally:
                    ms.stop()
        except Exception as exc:
            log(f"mlserver part failed: {exc}")
            results["failures"].append({"part": "mlserver", "error": f"{type(exc).__name__}: {exc}",
                                        "trace": traceback.format_exc()[-3000:]})

    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["ratios"] = ratios(results)
    out = RESULTS / f"{run_id}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print(ratios_summary(results["ratios"]))
    if "shadow_cost" in results:
        from bench import shadow_cost

        print(shadow_cost.summary(results["shadow_cost"]))
    for f in results["failures"]:
        print(f"FAILED {f['part']}: {f['error']}")
    print(f"\nresults: {out.relative_to(BENCH.parent)}  (pinning: loadgen cpus {lg_cpus or 'all'}, servers {srv_cpus or 'all'}; "
          f"load average {os.getloadavg()[0]:.2f})")
    return 1 if results["failures"] and not results["scenarios"] else 0


if __name__ == "__main__":
    sys.exit(main())
