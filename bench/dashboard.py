"""The Grafana dashboard's panels, rendered from a real Prometheus scraping the real service under load.

    uv run python -m bench.dashboard [--minutes 4] [--out docs/img/dashboard.png]

No Grafana can be installed on the build machine (not in Debian, no image registry), so this draws
the dashboard itself: every panel of ``deploy/grafana/dashboards/fraudscore.json`` at its grid
position, each of its PromQL expressions evaluated by a real Prometheus (Debian's ``prometheus``;
``PROMETHEUS`` names another binary) over the run, plotted with matplotlib. The queries, titles,
units and layout are the dashboard's; the pixels are not Grafana's.

The run: the service as in ``bench.overload`` (real Redis, trained model, filled cache, ``fraudscore
serve --workers 2`` with ``FRAUDSCORE_METRICS_PORT``: one endpoint per worker, both scraped every
5 s), then ``fsload`` (the callers send their timeout) at 0.5x of the measured capacity, 2x for a
minute (admission control sheds), 0.5x again; a few malformed calls for the error panel. Panels of
what this run does not exercise (shadow, canary, batch jobs) stay empty, as in Grafana between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.common import REPO, log, stop

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "fraudscore.json"
UNITS = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "/s"), "short": (1.0, "")}


def prometheus_binary() -> str:
    exe = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if not exe:
        raise SystemExit("bench.dashboard needs Prometheus: apt-get install prometheus (or PROMETHEUS=/path)")
    return exe


class Prometheus:
    def __init__(self, targets: list[str], work: Path) -> None:
        from tests.servers.common import free_port

        self.port = free_port()
        config = work / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "scrape_configs": [{"job_name": "fraudscore", "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(work / "prometheus.log", "wb")
        self.proc = subprocess.Popen([prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={work}/tsdb",
                                      f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prometheus did not become ready")

    def query_range(self, expr: str, start: float, end: float, step: float = 5.0) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/query_range?{q}", timeout=30) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        stop(self.proc, timeout=10)
        self.log.close()


def _label(metric: dict, legend: str | None) -> str:
    if legend:
        out = legend
        for k, v in metric.items():
            out = out.replace("{{" + k + "}}", v)
        return out
    return ",".join(f"{k}={v}" for k, v in metric.items() if k != "__name__") or "value"


def render(prom: Prometheus, start: float, end: float, dest: Path, note: str) -> dict:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.42))
    grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2, top=0.985, bottom=0.01)
    seen: dict[str, int] = {}
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] + 1:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        scale, suffix = UNITS.get(unit, (1.0, ""))
        ax.set_title(panel["title"], fontsize=8, loc="left")
        ax.tick_params(labelsize=6)
        series = []
        for target in panel.get("targets", []):
            for res in prom.query_range(target["expr"], start, end):
                pts = [(float(t) - start, float(v) * scale) for t, v in res["values"] if not math.isnan(float(v))]
                if pts:
                    series.append((_label(res["metric"], target.get("legendFormat")), pts))
        seen[panel["title"]] = len(series)
        if not series:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", fontsize=8, color="grey",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        kind = panel.get("type")
        if kind in ("stat", "table", "bargauge"):
            last = [(name, pts[-1][1]) for name, pts in series]
            if kind == "stat":
                ax.text(0.5, 0.5, f"{last[0][1]:.1f}{suffix}", ha="center", va="center", fontsize=22,
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            elif kind == "bargauge":
                last.sort(key=lambda x: x[1])
                ax.barh([n for n, _ in last], [v for _, v in last], color=["C3" if v > 0.2 else "C2" for _, v in last])
                ax.axvline(0.2, color="red", lw=0.8, ls="--")
                ax.tick_params(axis="y", labelsize=5)
            else:
                ax.axis("off")
                ax.table(cellText=[[n] for n, _ in last][:8], colLabels=["labels"], loc="center", fontsize=6)
            continue
        for name, pts in series[:8]:
            ax.plot([p[0] / 60 for p in pts], [p[1] for p in pts], lw=1, label=name[:40])
        ax.set_xlabel("minutes", fontsize=6)
        if suffix:
            ax.set_ylabel(suffix, fontsize=6)
        ax.legend(fontsize=5, loc="upper left")
    fig.suptitle(f"{board.get('title', 'dashboard')}: {DASHBOARD.relative_to(REPO)} rendered by bench/dashboard.py "
                 f"from a real Prometheus (not a Grafana screenshot). {note}", fontsize=9, y=0.995)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=80, bbox_inches="tight")
    return seen


def malformed_calls(address: str, n: int) -> None:
    import grpc

    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/fraudscore.v1.FraudScoring/Score")
        for _ in range(n):
            try:
                call(b"\xff\xff not a request", timeout=2)
            except grpc.RpcError:
                pass


def main(argv: list[str] | None = None) -> int:
    from bench import overload as O
    from tests.servers.common import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="the whole load; the 2x overload is a quarter of it")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dashboard.png")
    args = ap.parse_args(argv)
    metrics_port = free_port()
    work = Path(tempfile.mkdtemp(prefix="fs-dashboard-"))
    traffic, envr, svc = O.start_service(args.workers, {"FRAUDSCORE_METRICS_PORT": str(metrics_port)})
    prom = None
    try:
        prom = Prometheus([f"127.0.0.1:{metrics_port + i}" for i in range(args.workers)], work)
        capacity, _ = O.measure_capacity(svc, envr, traffic, "dash", 1.0)
        phase = args.minutes * 60 / 4
        total = int(capacity * 2 * phase * 1.2) + 2000
        path = O.requests_file(traffic, envr, "mixed", total * 2, "dashboard")
        start = time.time()
        offset = 0
        plan = [(0.5, phase * 1.5), (2.0, phase), (0.5, phase * 1.5)]
        for load, seconds in plan:
            res = O.fsload_run(svc, envr, path, mode="open", rps=load * capacity, seconds=seconds, warmup=0,
                               offset=offset, deadline_s=1.0)
            offset += int(load * capacity * seconds) + 100
            log(f"{load}x for {seconds:.0f}s: {res['codes']}")
            malformed_calls(svc.address, 5)
        time.sleep(12)  # two more scrapes
        end = time.time()
        note = (f"{args.workers} workers on the 2-core machine; open-loop load 0.5x, 2x, 0.5x of the measured capacity "
                f"({capacity:.0f}/s); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}")
        seen = render(prom, start, end, args.out, note)
        log(f"wrote {args.out}; panels with data: {sum(1 for v in seen.values() if v)} of {len(seen)}")
        print(json.dumps({"bench": "dashboard", "out": str(args.out), "capacity_rps": capacity,
                          "series_per_panel": seen}, indent=2))
        path.unlink(missing_ok=True)
    finally:
        if prom is not None:
            prom.stop()
        svc.stop()
        envr.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
