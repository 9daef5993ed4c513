"""The Grafana dashboard and the Prometheus config in deploy/: every metric a panel queries exists in the code."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/fraudscore.json"
METRIC = re.compile(r"\bfraudscore_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names_in_code() -> set[str]:
    """Every string literal of scoring_service that names a metric (``fraudscore_...``)."""
    names: set[str] = set()
    for path in (ROOT / "scoring_service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(METRIC, node.value):
                names.add(node.value)
    return names


def queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {m for panel in dashboard["panels"] for t in panel["targets"] for m in METRIC.findall(t["expr"])}


def test_every_metric_the_dashboard_queries_is_exported_by_the_code() -> None:
    known = metric_names_in_code()
    queried = queried_metrics()
    assert len(queried) >= 15
    missing = sorted(m for m in queried
                     if m not in known and not any(m.endswith(s) and m.removesuffix(s) in known for s in SUFFIXES))
    assert not missing, f"the dashboard queries metrics no code exports: {missing}"


def test_the_check_catches_a_misspelt_metric() -> None:
    known = metric_names_in_code()
    assert "fraudscore_answers_total" in known and "fraudscore_answer_latency_seconds" in known
    assert "fraudscore_answer_latency_secs" not in known


def test_the_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "fraudscore"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert all(p["datasource"]["uid"] == datasource["uid"] for p in dashboard["panels"])
    provider = yaml.safe_load((ROOT / "deploy/grafana/dashboards/fraudscore.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"  # compose mounts deploy/grafana there


def test_prometheus_scrapes_the_scorer_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "fraudscore"]
    assert any(t.startswith("scorer:") for c in job["static_configs"] for t in c["targets"])
