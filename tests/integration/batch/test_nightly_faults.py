"""The Kafka broker killed in the middle of a nightly, against a real broker, Redis and service (issue 13).

The run is paused in the middle of its read (a source that stops after its first batch of messages
until the test says go: ``python -m tests.integration.batch.test_nightly_faults AS_OF MARKER_DIR`` runs
the real ``fraudscore nightly`` command with it), the broker is killed (SIGKILL), and the run goes on
against no broker. It must fail cleanly: a clear message, a non-zero exit, its run recorded
``failed``, the previous cache generation still active and serving CACHE answers. Once the broker
is restarted on its data, a rerun gives the same entries as the uninterrupted run before.

One broker of its own for the module (it is killed), and a lean slice of the handbook.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
import redis
from sqlalchemy.orm import Session

from tests.integration.batch.conftest import AS_OF, cli_env, generation_contents, settings_for
from tests.servers.common import REPO_ROOT, wait_for_port

pytestmark = pytest.mark.integration
AS_OF_S = pd.Timestamp(AS_OF).value / 1e9
LEAN_CUSTOMERS = 300  # of the slice's 1,000: the fault is the point, not the volume


class RestartableKafka:
    """A :class:`tests.servers.kafka.KafkaServer` that can be killed and started again on its data and ports."""

    def __init__(self) -> None:
        from tests.servers.kafka import KafkaServer

        self.server = KafkaServer().start()

    @property
    def bootstrap(self) -> str:
        return self.server.bootstrap

    def kill(self) -> None:
        assert self.server.proc is not None
        self.server.proc.kill()
        self.server.proc.wait(10)

    def restart(self, timeout: float = 90) -> None:
        from tests.servers.kafka import LOG4J, kafka_libs

        s = self.server
        root = s.root
        jvm = [f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={root}"]
        s.proc = subprocess.Popen(
            ["java", f"-Xmx{s.heap}", f"-Xms{s.heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Djava.awt.headless=true", *jvm, "-cp", f"{kafka_libs()}/*", "kafka.Kafka",
             os.path.join(root, "server.properties")],
            stdout=open(os.path.join(root, "stdout.log"), "ab"), stderr=subprocess.STDOUT,
        )
        wait_for_port(s.port, timeout, s.proc)
        s._wait_ready(timeout)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[RestartableKafka]:
    kafka = RestartableKafka()
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def lean_published(broker: RestartableKafka, handbook_slice: pd.DataFrame) -> str:
    from scoring_service.adapters.kafka import kafka_io

    prefix = f"fs-fault-{uuid.uuid4().hex[:6]}"
    lean = handbook_slice.loc[handbook_slice["customer_id"].astype(int) < LEAN_CUSTOMERS]
    kafka_io.publish_frame(broker.bootstrap, f"{prefix}.payments", f"{prefix}.labels", lean)
    return prefix


def _run_row(settings: Any, run_id: int) -> Any:
    from scoring_service.adapters.sql.db import BatchRun, make_engine

    with Session(make_engine(settings.resolved_database_url())) as s:
        row = s.get(BatchRun, run_id)
        s.expunge_all()
        return row


def _last_run_id(settings: Any) -> int:
    from sqlalchemy import func, select

    from scoring_service.adapters.sql.db import BatchRun, make_engine

    with Session(make_engine(settings.resolved_database_url())) as s:
        return int(s.scalar(select(func.max(BatchRun.id))) or 0)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the nightly ended before its read was paused:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the nightly did not reach its read within {timeout} s")
        time.sleep(0.1)


def test_broker_killed_mid_nightly_fails_cleanly_old_generation_serves_and_a_rerun_matches(
        broker, lean_published, batch_env, redis_url, tmp_path):
    from scoring_service.bootstrap import run_nightly
    from scoring_service.core.cache_layout import active_generation_key
    from scoring_service.protos import scoring_pb2
    from tests.e2e.test_score_grpc import request
    from tests.servers.scorer import ScorerProcess

    settings = settings_for(batch_env, broker.bootstrap, lean_published, redis_url)
    base = run_nightly(settings, as_of=AS_OF_S, show_progress=False)  # the uninterrupted run
    r = redis.Redis.from_url(redis_url)
    akey = active_generation_key(base.model_version)
    assert r.get(akey).decode() == base.generation
    expected = generation_contents(r, base.model_version, base.generation)
    card = next(k.split(":", 1)[1] for k in sorted(expected) if k.startswith("c:"))

    scorer = ScorerProcess(Path(batch_env["FRAUDSCORE_DATA_DIR"]), redis_url, env={"FRAUDSCORE_REDIS_TIMEOUT_MS": "80"})
    try:
        scorer.start(timeout=300)
        with grpc.insecure_channel(scorer.address) as ch:
            assert scorer.stub(ch).Score(request(card), timeout=5).source == scoring_pb2.CACHE

        marker = tmp_path / "markers"
        marker.mkdir()
        env = cli_env(batch_env, broker.bootstrap, lean_published, redis_url)
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.batch.test_nightly_faults", AS_OF, str(marker)],
                                env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(marker / "reading", proc, 400)
            broker.kill()  # in the middle of the read: some messages consumed, the rest never will be
            (marker / "go").touch()
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        print(f"nightly with the broker killed: exit {proc.returncode}; stderr: {err.strip()[-600:]}")
        assert proc.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors and "kafka" in errors[0].lower() and "Traceback" not in err
        run = _run_row(settings, _last_run_id(settings))
        assert run.job == "nightly" and run.status == "failed" and "nothing switched" in (run.error or "")
        assert run.generation != base.generation and run.finished_at is not None

        assert r.get(akey).decode() == base.generation  # nothing switched
        with grpc.insecure_channel(scorer.address) as ch:
            again = scorer.stub(ch).Score(request(card), timeout=5)
        assert again.source == scoring_pb2.CACHE and not again.degraded  # the old generation keeps serving
    finally:
        scorer.stop()

    broker.restart()
    done = subprocess.run([sys.executable, "-m", "scoring_service.cli", "nightly", "--as-of", AS_OF, "--json"],
                          env=cli_env(batch_env, broker.bootstrap, lean_published, redis_url), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rerun = json.loads(done.stdout.strip().splitlines()[-1])
    assert rerun["status"] == "succeeded" and r.get(akey).decode() == rerun["generation"] != base.generation
    assert rerun["events_consumed"] == base.events_consumed
    assert generation_contents(r, base.model_version, rerun["generation"]) == expected  # as if never interrupted


# ------------------------------------------------------------------------------------ the paused nightly
class PausingSource:
    """An event source that pauses after its first batch of messages until ``<marker>/go`` exists."""

    def __init__(self, inner: Any, marker: Path) -> None:
        self.inner, self.marker, self.paused = inner, marker, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_window(self, start: float, end: float, *, labels_until: float | None = None,
                    progress: Any = None) -> Any:
        def advance(n: int) -> None:
            if not self.paused:
                self.paused = True
                (self.marker / "reading").touch()
                deadline = time.monotonic() + 120
                while not (self.marker / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            if progress is not None:
                progress(n)

        return self.inner.read_window(start, end, labels_until=labels_until, progress=advance)


def main() -> None:
    """``fraudscore nightly --as-of AS_OF`` (the real command: its error handling and exit codes) with a pausing source."""
    from scoring_service import bootstrap
    from scoring_service.cli import app

    as_of, marker = sys.argv[1], Path(sys.argv[2])
    real = bootstrap.event_source

    def pausing(*args: Any, **kwargs: Any) -> Any:
        return PausingSource(real(*args, **kwargs), marker)

    bootstrap.event_source = pausing  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(app(["nightly", "--as-of", as_of, "--json"], standalone_mode=True))


if __name__ == "__main__":
    main()
