"""``fraudscore nightly`` with nothing to read: a window without events, topics not created yet.

Against a real Kafka broker, a real Redis and the real command line, because each defect showed
only there: the empty window crashed in the Redis write (``OverflowError``), the missing topic was
reported as an unreachable Kafka by the read, and the score phase's count is a log line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pandas as pd
import pytest
import redis

from scoring_service.adapters.kafka import kafka_io
from scoring_service.adapters.sql.db import BatchRun, make_engine
from scoring_service.batch.pipeline import BatchError
from scoring_service.bootstrap import run_nightly
from scoring_service.core.cache_layout import active_generation_key
from tests.integration.batch.conftest import AS_OF, cli_env, settings_for
from tests.servers.common import REPO_ROOT

pytestmark = pytest.mark.integration
LATER = "2019-06-01"  # months after the last published event: an empty window


def _cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _error(stderr: str) -> str:
    """The command's one ``error:`` message, its wrapped lines joined (rich wraps at 80 columns in a pipe)."""
    starts = [i for i, line in enumerate(stderr.splitlines()) if line.startswith("error:")]
    assert len(starts) == 1, stderr[-3000:]
    return " ".join(" ".join(stderr.splitlines()[starts[0]:]).split())


def _logged(stderr: str, event: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def _active_generations(r: redis.Redis) -> dict[bytes, bytes | None]:
    return {k: r.get(k) for k in r.scan_iter(match="fs:1:*:active")}


def test_a_window_without_events_fails_in_one_line_and_the_previous_generation_keeps_serving(
        kafka_bootstrap, batch_env, redis_url, handbook_slice):
    """Exit 2, the run recorded ``failed``, nothing written or switched: a nightly that "succeeded"
    on no events would let the cache age past its TTL with every run green."""
    prefix = f"fs-empty-{uuid.uuid4().hex[:6]}"
    small = handbook_slice.loc[handbook_slice["timestamp"] >= pd.Timestamp(AS_OF) - pd.Timedelta(days=3)]
    kafka_io.publish_frame(kafka_bootstrap, f"{prefix}.payments", f"{prefix}.labels", small)
    env = cli_env(batch_env, kafka_bootstrap, prefix, redis_url)
    done = _cli("nightly", "--as-of", AS_OF, "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    base = json.loads(done.stdout.strip().splitlines()[-1])
    [score] = [p for p in _logged(done.stderr, "batch.phase_done") if p["phase"] == "score"]
    assert score["items"] == base["entities_scored"] > 0  # was 0 whatever the run scored
    r = redis.Redis.from_url(redis_url)
    akey = active_generation_key(base["model_version"])
    assert r.get(akey).decode() == base["generation"]

    empty = _cli("nightly", "--as-of", LATER, env=env)
    assert empty.returncode == 2, empty.stderr[-3000:]
    error = _error(empty.stderr)
    assert "no payments in the window 2019-04-" in error and "0 events read" in error
    assert "nothing switched, the previous cache generation keeps serving" in error
    assert "Traceback" not in empty.stderr and "Overflow" not in empty.stderr
    assert r.get(akey).decode() == base["generation"]
    [failed] = _logged(empty.stderr, "batch.failed")
    with make_engine(settings_for(batch_env, None, None, redis_url).resolved_database_url()).connect() as conn:
        row = conn.execute(BatchRun.__table__.select().where(BatchRun.id == failed["run_id"])).one()
    assert row.status == "failed" and "no payments in the window" in row.error and row.keys_written in (0, None)


def test_the_file_source_with_no_payments_in_the_window_fails_the_same_way(batch_env, redis_url, handbook_slice,
                                                                           tmp_path):
    path = tmp_path / "events.parquet"
    handbook_slice.tail(500).to_parquet(path)
    settings = settings_for(batch_env, None, None, redis_url)
    r = redis.Redis.from_url(redis_url)
    before = _active_generations(r)
    with pytest.raises(BatchError, match=r"no payments in the window .* from .*events\.parquet \(0 events read\)"):
        run_nightly(settings, as_of=pd.Timestamp(LATER).value / 1e9, source=path, show_progress=False)
    assert _active_generations(r) == before


def test_a_nightly_before_its_topics_exist_names_the_missing_topic_not_an_unreachable_kafka(
        kafka_bootstrap, batch_env, redis_url):
    prefix = f"fs-unborn-{uuid.uuid4().hex[:6]}"
    r = redis.Redis.from_url(redis_url)
    before = _active_generations(r)
    done = _cli("nightly", "--as-of", AS_OF, env=cli_env(batch_env, kafka_bootstrap, prefix, redis_url), timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    error = _error(done.stderr)
    assert f"'{prefix}.payments'" in error and f"'{prefix}.labels'" in error and "do not exist" in error
    assert "unreachable" not in error and "Traceback" not in done.stderr
    assert not _logged(done.stderr, "batch.start")  # found before a run is recorded
    assert kafka_io.partitions_of(kafka_bootstrap, f"{prefix}.payments") == []  # and not created by the attempt
    assert _active_generations(r) == before
