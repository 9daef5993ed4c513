"""The benchmark's pictures for the README, from a ``bench/run.py`` results JSON (matplotlib, no server).

    uv run python -m bench.plots [--input bench/results/X.json] [--out docs/img]

* ``latency_hist.png``: the latency distribution of each scenario at its lightest open-loop load
  (the percentiles the load generator records: p50, p90, p95, p99, p99.9, max), log scale.
* ``throughput_p99.png``: p99 latency against the offered load (the open-loop runs at fixed rates),
  one curve per scenario, log scale: where each curve leaves the budget is that setup's capacity.

Without ``--input``: the newest results file under ``bench/results/`` that holds scenarios. Prints
JSON (the files written and what they were drawn from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PERCENTILES = [("p50", "p50"), ("p90", "p90"), ("p95", "p95"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")]


def newest_results() -> Path:
    for path in sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if json.loads(path.read_text()).get("scenarios"):
                return path
        except (ValueError, AttributeError):
            continue
    raise SystemExit(f"no results with scenarios under {RESULTS}: run `make bench` (bench/run.py) first")


def latency_hist(scenarios: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(len(scenarios), 1)
    for i, sc in enumerate(scenarios):
        runs = [r for r in sc["runs"] if r["mode"] == "open"] or sc["runs"]
        run = min(runs, key=lambda r: r.get("target_rps") or r["achieved_rps"])
        lat = run["latency_ms"]
        xs = [j + i * width for j in range(len(PERCENTILES))]
        ax.bar(xs, [lat[k] for k, _ in PERCENTILES], width,
               label=f"{sc['name']} @ {run['achieved_rps']:.0f}/s")
    ax.set_xticks([j + width * (len(scenarios) - 1) / 2 for j in range(len(PERCENTILES))])
    ax.set_xticklabels([label for _, label in PERCENTILES])
    ax.set_yscale("log")
    ax.set_ylabel("client latency (ms, log)")
    ax.set_title("Score() latency distribution at light load (open loop)")
    ax.axhline(100, color="red", linestyle="--", linewidth=1, label="100 ms budget")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def throughput_p99(scenarios: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    for sc in scenarios:
        points = sorted((r["target_rps"], r["latency_ms"]["p99"]) for r in sc["runs"] if r["mode"] == "open")
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sc["name"])
    ax.set_yscale("log")
    ax.set_xlabel("offered load (calls/s, open loop)")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_title("p99 latency against the offered load")
    ax.axhline(100, color="red", linestyle="--", linewidth=1, label="100 ms budget")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="a bench/run.py results JSON (default: the newest)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    source = args.input or newest_results()
    if not source.is_file():
        print(f"error: no such file: {source}", file=sys.stderr)
        return 2
    data = json.loads(source.read_text())
    scenarios = [sc for sc in data.get("scenarios", []) if sc.get("runs")]
    if not scenarios:
        print(f"error: {source} holds no scenarios with runs", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    hist, curve = args.out / "latency_hist.png", args.out / "throughput_p99.png"
    latency_hist(scenarios, hist)
    throughput_p99(scenarios, curve)
    print(json.dumps({"input": str(source), "scenarios": [sc["name"] for sc in scenarios],
                      "written": [str(hist), str(curve)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
