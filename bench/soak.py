"""Soak: an hour at 60 % of capacity; p99 and RSS per minute, and their linear trends.

    uv run python -m bench.soak [--minutes 60] [--load 0.6] [--workers N] [--out bench/results/soak-X.json]

The service as in ``bench.overload`` (real Redis, trained model, filled cache, ``fraudscore serve``).
Capacity first (closed loop, 64 callers, traffic ``mixed``), then one open-loop ``fsload`` run a
minute at ``load x capacity``, each minute with new unseen cards (10 % of the traffic). After each
minute: p50/p99 of the OK answers, the status codes, and the resident memory (VmRSS) of every
server process (the parent and its workers) and of Redis. The trend of each series is a least
squares line: its slope per hour, and that slope over the series' mean. The machine is shared, so
a minute's p99 is noisy: read the trend, not a minute. JSON in ``bench/results/soak-<stamp>.json``
(or ``--out``), the plot in ``docs/img/soak.png`` (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import NCPU, REPO, log, tree_pids
from bench.overload import RESULTS, fsload_run, measure_capacity, requests_file, start_service


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def trend(values: list[float]) -> dict:
    """Least-squares slope per hour (per-minute samples) and relative to the mean."""
    import numpy as np

    y = np.array([v for v in values if v is not None], dtype=float)
    if len(y) < 2:
        return {"slope_per_hour": None, "slope_per_hour_vs_mean": None, "mean": float(y.mean()) if len(y) else None}
    slope, _ = np.polyfit(np.arange(len(y), dtype=float), y, 1)
    mean = float(y.mean())
    return {"slope_per_hour": round(float(slope) * 60, 3), "slope_per_hour_vs_mean": round(float(slope) * 60 / mean, 4)
            if mean else None, "mean": round(mean, 3), "first": round(float(y[0]), 3), "last": round(float(y[-1]), 3)}


def plot(out: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["minutes"]
    x = [r["minute"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(x, [r["p99_ms"] for r in rows], marker=".", label="p99")
    a.plot(x, [r["p50_ms"] for r in rows], marker=".", label="p50")
    a.axhline(out["budget_ms"], color="red", lw=0.8, ls="--", label="budget")
    a.set_ylabel("latency of OK answers (ms)")
    a.set_title(f"soak: {out['target_rps']:.0f}/s ({out['load']:.0%} of {out['capacity_rps']:.0f}/s), "
                f"{out['server']['workers']} workers, shared 2-core VM")
    a.legend(loc="upper right")
    b.plot(x, [r["server_rss_mib"] for r in rows], marker=".", label="server processes (sum)")
    b.plot(x, [r["redis_rss_mib"] for r in rows], marker=".", label="redis")
    b.set_ylabel("RSS (MiB)")
    b.set_xlabel("minute")
    b.legend(loc="center right")
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--load", type=float, default=0.6)
    ap.add_argument("--workers", type=int, default=NCPU)
    ap.add_argument("--deadline-ms", type=float, default=1000.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "soak.png")
    args = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = args.out or RESULTS / f"soak-{stamp}.json"
    deadline_s = args.deadline_ms / 1000
    traffic, envr, svc = start_service(args.workers)
    out: dict = {"bench": "soak", "stamp": stamp, "budget_ms": 100.0, "load": args.load, "server": svc.describe(),
                 "mix": "mixed", "deadline_ms": args.deadline_ms, "minutes": []}
    try:
        capacity, out["capacity"] = measure_capacity(svc, envr, traffic, f"soak{stamp}", deadline_s)
        out["capacity_rps"] = capacity
        out["target_rps"] = target = args.load * capacity
        log(f"capacity {capacity:.0f}/s; soak at {target:.0f}/s for {args.minutes} min")
        per_minute = int(target * 62) + 1000
        for minute in range(args.minutes):
            path = requests_file(traffic, envr, "mixed", per_minute, f"soak{stamp}m{minute}")
            res = fsload_run(svc, envr, path, mode="open", rps=target, seconds=60 if minute else 55,
                             warmup=0 if minute else 5, offset=0, deadline_s=deadline_s)
            pids = tree_pids(svc.proc.pid)
            row = {"minute": minute + 1, "at": time.strftime("%H:%M:%S", time.gmtime()), "ok_rps": round(res["achieved_rps"], 1),
                   "p50_ms": res["latency_ms"].get("p50"), "p99_ms": res["latency_ms"].get("p99"),
                   "max_ms": res["latency_ms"].get("max"), "codes": res["codes"], "degraded": res.get("flag_count", 0),
                   "server_rss_mib": round(sum(rss_mib(p) for p in pids), 1),
                   "server_rss_by_pid_mib": {str(p): round(rss_mib(p), 1) for p in pids},
                   "redis_rss_mib": round(rss_mib(envr.redis.proc.pid), 1),
                   "resource_exhausted_share": round(res["codes"].get("ResourceExhausted", 0)
                                                     / max(res["requests_measured"], 1), 4),
                   "server_cpu_s_per_1k": round(res["server_cpu_s_per_1k"], 3)}
            out["minutes"].append(row)
            log(f"minute {minute + 1}: {row['ok_rps']}/s p99 {row['p99_ms']:.1f} ms rss {row['server_rss_mib']} MiB "
                f"codes {row['codes']}")
            path.unlink(missing_ok=True)
            out["trend"] = {k: trend([r[k] for r in out["minutes"]]) for k in ("p99_ms", "server_rss_mib", "redis_rss_mib")}
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(out, indent=2))  # after every minute: a cut-short run keeps what it measured
    finally:
        svc.stop()
        envr.stop()
    if out["minutes"] and args.plot:
        plot(out, args.plot)
        log(f"plot {args.plot}")
    print(json.dumps({k: v for k, v in out.items() if k != "minutes"}, indent=2))
    log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
