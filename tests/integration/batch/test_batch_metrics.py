"""Batch runs serve their Prometheus metrics while they run (real Kafka, Redis, HTTP; no mocks).

A slow nightly (the real pipeline, a cache writer that pauses between chunks) is scraped while it
writes and after the end; the last scrape equals the metrics of the run's JSON and record.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy.orm import Session

from scoring_service.adapters.kafka import kafka_io
from scoring_service.adapters.sql.db import BatchRun, make_engine
from scoring_service.batch.metrics import PHASES, samples_by_key
from scoring_service.config import load_settings
from scoring_service.protos import events_pb2
from tests.integration.batch.conftest import AS_OF, cli_env, settings_for
from tests.servers.common import REPO_ROOT, free_port

pytestmark = pytest.mark.integration
AS_OF_S = pd.Timestamp(AS_OF).value / 1e9

# fraudscore nightly as the CLI runs it (bootstrap.batch_metrics around bootstrap.run_nightly), with the
# slow cache writer of slow_nightly.py: the write phase lasts seconds, long enough to be scraped mid-run
SLOW_NIGHTLY = """
import json, sys
from scoring_service import bootstrap
from scoring_service.config import load_settings
from scoring_service.core.features import epoch_seconds
from tests.integration.batch.slow_nightly import SlowWriter

settings = load_settings()
with bootstrap.batch_metrics(settings, "nightly") as metrics:
    result = bootstrap.run_nightly(settings, as_of=epoch_seconds(sys.argv[1]), show_progress=False, metrics=metrics,
                                   writer=SlowWriter(bootstrap.batch_cache_writer(settings), chunk=200, pause_s=0.2))
    print(json.dumps(result.to_json(), default=str), flush=True)
"""


def _scrape(port: int) -> dict[str, float] | None:
    """The nightly's samples (``name{labels}`` -> value), None while nothing listens on the port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None
    return samples_by_key(text_string_to_metric_families(text), "nightly")


def _scrape_until_exit(proc: subprocess.Popen, port: int, timeout: float = 240) -> list[dict[str, float]]:
    scrapes = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        s = _scrape(port)
        if s:
            scrapes.append(s)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    return scrapes


def _phase(s: dict[str, float]) -> str:
    (current,) = [p for p in PHASES if s.get(f'fraudscore_batch_phase{{phase="{p}"}}') == 1]
    return current


def _metrics_env(env: dict[str, str], port: int, linger_s: float) -> dict[str, str]:
    return {**env, "FRAUDSCORE_BATCH_METRICS_PORT": str(port), "FRAUDSCORE_BATCH_METRICS_ADDR": "127.0.0.1",
            "FRAUDSCORE_BATCH_METRICS_LINGER_S": str(linger_s)}


@pytest.fixture(scope="module")
def small_with_poison(kafka_bootstrap, handbook_slice) -> str:  # type: ignore[no-untyped-def]
    """The slice's last 10 days plus two poison payments (dead letters) under a prefix of their own."""
    prefix = f"fs-metrics-{uuid.uuid4().hex[:6]}"
    small = handbook_slice.loc[handbook_slice["timestamp"] >= pd.Timestamp(AS_OF) - pd.Timedelta(days=10)]
    kafka_io.publish_frame(kafka_bootstrap, f"{prefix}.payments", f"{prefix}.labels", small)
    bad = events_pb2.PaymentEvent(transaction_id="neg-1", customer_id="c", terminal_id="t", amount=-5.0)
    bad.timestamp.FromSeconds(int(AS_OF_S - 3600))
    p = kafka_io.EventProducer(kafka_bootstrap)
    t_ms = int((AS_OF_S - 3600) * 1000)
    p.produce(f"{prefix}.payments", b"not a protobuf \xff\xff\xff", b"poison", t_ms)
    p.produce(f"{prefix}.payments", bad.SerializeToString(), b"poison", t_ms)
    p.flush()
    return prefix


def test_slow_nightly_is_scraped_while_it_writes_and_at_the_end(kafka_bootstrap, small_with_poison, batch_env,
                                                                redis_url):
    port = free_port()
    env = _metrics_env(cli_env(batch_env, kafka_bootstrap, small_with_poison, redis_url), port, linger_s=300)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_NIGHTLY, AS_OF], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scrapes = _scrape_until_exit(proc, port)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and out["dead_letters"] == 2  # the two poison payments

    # at the end: the last scrape is the run's JSON, count for count
    final = scrapes[-1]
    assert final == out["details"]["metrics"]
    assert _phase(final) == "succeeded"
    assert final["fraudscore_batch_events_consumed"] == out["events_consumed"] > 0
    assert final["fraudscore_batch_dead_letters"] == out["dead_letters"] == 2
    assert final["fraudscore_batch_entities"] == out["entities_scored"] > 0
    assert final["fraudscore_batch_keys_written"] == out["keys_written"] > 1000
    assert final["fraudscore_batch_run_duration_seconds"] == out["duration_s"]
    assert final["fraudscore_batch_run_id"] == out["run_id"]
    assert final["fraudscore_batch_generation_switch_seconds"] == out["phases"]["switch"]
    assert (final["fraudscore_batch_run_start_timestamp_seconds"]
            <= final["fraudscore_batch_generation_switch_timestamp_seconds"]
            <= final["fraudscore_batch_last_success_timestamp_seconds"])

    # while it ran: phases only move forward, and the keys written grow during the write phase
    phases = [_phase(s) for s in scrapes]
    assert [PHASES.index(p) for p in phases] == sorted(PHASES.index(p) for p in phases)
    writing = [s for s, p in zip(scrapes, phases, strict=True) if p == "write"]
    keys = [s["fraudscore_batch_keys_written"] for s in writing]
    assert keys == sorted(keys) and len({k for k in keys if 0 < k < out["keys_written"]}) >= 2
    assert all(s["fraudscore_batch_events_consumed"] == out["events_consumed"] for s in writing)
    assert all(s["fraudscore_batch_dead_letters"] == 2 for s in writing)
    assert all("fraudscore_batch_last_success_timestamp_seconds" not in s for s in writing)

    # and in the run's record
    settings = settings_for(batch_env, kafka_bootstrap, small_with_poison, redis_url)
    with Session(make_engine(settings.resolved_database_url())) as session:
        run = session.get(BatchRun, out["run_id"])
        assert run is not None and run.dead_letters == 2
        assert run.details["metrics"] == final


def test_cli_nightly_port_stays_until_the_final_scrape(kafka_bootstrap, small_with_poison, batch_env, redis_url):
    port = free_port()
    env = _metrics_env(cli_env(batch_env, kafka_bootstrap, small_with_poison, redis_url), port, linger_s=3600)
    proc = subprocess.Popen([sys.executable, "-m", "scoring_service.cli", "nightly", "--as-of", AS_OF, "--json",
                             "--metrics-port", str(port)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the linger is an hour: the process ends because a scrape read the final values, not because it ran out
    scrapes = _scrape_until_exit(proc, port, timeout=240)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert scrapes and scrapes[-1] == out["details"]["metrics"] and _phase(scrapes[-1]) == "succeeded"
    assert scrapes[-1]["fraudscore_batch_keys_written"] == out["keys_written"]


def test_metrics_port_errors_are_clear(batch_env):
    env = _metrics_env({**os.environ, **batch_env}, 0, linger_s=0)
    with socket.socket() as busy:  # a port something else listens on: refused before any work, exit 2
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run([sys.executable, "-m", "scoring_service.cli", "nightly", "--as-of", AS_OF,
                                "--metrics-port", str(port)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120)
    assert taken.returncode == 2 and "Traceback" not in taken.stderr, taken.stderr[-2000:]
    assert "FRAUDSCORE_BATCH_METRICS_PORT" in taken.stderr and "cannot listen" in taken.stderr

    for bad in (0, 70000):  # the CLI turns these into "invalid configuration: ... batch_metrics_port", exit 2
        with pytest.raises(ValidationError, match="batch_metrics_port"):
            load_settings(batch_metrics_port=bad)
