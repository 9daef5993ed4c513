"""The registry at start: a damaged active artifact does not keep the service down, and does not put
a version nobody activated on every card either; no demo model in production."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service import bootstrap
from scoring_service.adapters.model.gbdt import sha256_file
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.config import Settings
from scoring_service.protos import scoring_pb2
from tests.servers.common import REPO_ROOT
from tests.servers.scorer import ScorerProcess, serve_command

pytestmark = pytest.mark.e2e


def test_a_damaged_active_artifact_falls_back_to_the_version_active_before_it_loudly(
        model_data_dir: Path, redis_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = bootstrap.registry(Settings(data_dir=data_dir))
    good = registry.active()
    assert good is not None
    artifact = data_dir / "damaged" / Path(good.artifact_path).name
    artifact.parent.mkdir()
    shutil.copy(good.artifact_path, artifact)
    bad = registry.register(
        version=good.version + "-damaged", framework=good.framework, artifact_path=artifact, sha256=sha256_file(artifact),
        feature_names=good.feature_names, thresholds=good.thresholds, policy=good.policy, activate=True,
    )
    with artifact.open("ab") as f:  # a disk or copy fault after registration
        f.write(b"\x00garbage")

    scorer = ScorerProcess(data_dir, redis_url, env={"FRAUDSCORE_REGISTRY_POLL_S": "0.3"}).start()  # SERVING
    try:
        with grpc.insecure_channel(scorer.address) as ch:
            r = scoring_pb2.ScoreRequest(request_id="r", transaction=scoring_pb2.Transaction(
                transaction_id=uuid.uuid4().hex, customer_id="c-damaged", terminal_id="T1", amount=10.0))
            r.transaction.timestamp.GetCurrentTime()
            assert scorer.stub(ch).Score(r, timeout=2).model_version == good.version
        time.sleep(1.5)  # several registry polls, each trying the active version again
        logs = scorer.logs()
        assert '"model.refused"' in logs and bad.version in logs
        assert '"model.serving_previous_version"' in logs
        assert logs.count('"model.refused"') == 1  # once, not at every registry poll
    finally:
        scorer.stop()
    assert registry.active().version == bad.version  # the service does not rewrite the registry


def _register_copy(registry: Registry, good: ModelRecord, data_dir: Path, version: str, *, activate: bool,
                   damaged: bool = False) -> ModelRecord:
    """``version``: a copy of ``good``'s artifact in a folder of its own under ``data_dir``, registered
    (and activated); ``damaged``: bytes appended after registration, so that its checksum no longer matches."""
    artifact = data_dir / version / Path(good.artifact_path).name
    artifact.parent.mkdir(parents=True)
    shutil.copy(good.artifact_path, artifact)
    record = registry.register(
        version=version, framework=good.framework, artifact_path=artifact, sha256=sha256_file(artifact),
        feature_names=good.feature_names, thresholds=good.thresholds, policy=good.policy, activate=activate,
    )
    if damaged:
        with artifact.open("ab") as f:
            f.write(b"\x00garbage")
    return record


def _score(scorer: ScorerProcess) -> str:
    """The model version that answers one Score call."""
    with grpc.insecure_channel(scorer.address) as ch:
        r = scoring_pb2.ScoreRequest(request_id="r", transaction=scoring_pb2.Transaction(
            transaction_id=uuid.uuid4().hex, customer_id="c-walk", terminal_id="T1", amount=10.0))
        r.transaction.timestamp.GetCurrentTime()
        return str(scorer.stub(ch).Score(r, timeout=2).model_version)


def _start_listening(scorer: ScorerProcess, timeout: float = 120.0) -> ScorerProcess:
    """``scorer`` started and listening (``server.started``), SERVING or not: ``ScorerProcess.start``
    waits for SERVING, which a service without a loadable model never reaches."""
    scorer.log_path = scorer.data_dir / f"scorer-{scorer.port}.log"
    with scorer.log_path.open("ab") as out:
        scorer.proc = subprocess.Popen(serve_command(scorer.address), cwd=REPO_ROOT, env=scorer.environment(),
                                       stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not scorer.log_events("server.started"):
        if scorer.proc.poll() is not None or time.monotonic() > deadline:
            scorer.stop()
            raise RuntimeError(f"scorer did not start (exit {scorer.proc.returncode}):\n{scorer.logs()[-4000:]}")
        time.sleep(0.2)
    return scorer


def _health(scorer: ScorerProcess) -> int:
    with grpc.insecure_channel(scorer.address) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


def test_a_damaged_active_version_falls_back_to_the_one_active_before_it_never_to_one_not_activated(
        model_data_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """V1 (loads) was active, then V2, then V3 (both damaged since); V4, registered last and never
    activated, loads. The start walks back V3 -> V2 -> V1 and serves V1: V4 is never even tried."""
    data_dir = tmp_path / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = bootstrap.registry(Settings(data_dir=data_dir))
    v1 = registry.active()
    assert v1 is not None
    v2 = _register_copy(registry, v1, data_dir, "walk-v2", activate=True, damaged=True)
    v3 = _register_copy(registry, v1, data_dir, "walk-v3", activate=True, damaged=True)
    v4 = _register_copy(registry, v1, data_dir, "walk-v4", activate=False)  # `fraudscore train --no-activate`
    assert registry.active().version == v3.version

    scorer = ScorerProcess(data_dir, redis_url, env={"FRAUDSCORE_REGISTRY_POLL_S": "0.3"}).start()  # SERVING
    try:
        assert _score(scorer) == v1.version
        time.sleep(1.0)  # registry polls: each walks again, none logs again
        refused = [e["model_version"] for e in scorer.log_events("model.refused")]
        assert refused == [v3.version, v2.version]  # in that order, once each; V4 never loaded
        [fallback] = scorer.log_events("model.serving_previous_version")
        assert (fallback["active"], fallback["serving"]) == (v3.version, v1.version)
        assert v4.version not in scorer.logs()
    finally:
        scorer.stop()


def test_with_no_previously_active_version_that_loads_the_service_stays_not_serving_and_says_so_once(
        model_data_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """V1 retired, V2 active and damaged, V3 only registered: nothing that was ever active can serve.
    The service answers NOT_SERVING with one ``model.no_version_loads`` line (not V3), and serves the
    next version activated without a restart."""
    data_dir = tmp_path / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = bootstrap.registry(Settings(data_dir=data_dir))
    v1 = registry.active()
    assert v1 is not None
    v2 = _register_copy(registry, v1, data_dir, "none-v2", activate=True, damaged=True)
    registry.retire(v1.version)
    v3 = _register_copy(registry, v1, data_dir, "none-v3", activate=False)

    scorer = _start_listening(ScorerProcess(data_dir, redis_url, env={"FRAUDSCORE_REGISTRY_POLL_S": "0.3"}))
    try:
        time.sleep(1.5)  # several registry polls
        assert _health(scorer) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert scorer.proc is not None and scorer.proc.poll() is None  # up, waiting for a version that loads
        [line] = scorer.log_events("model.no_version_loads")  # once, though the registry was polled ~50 times
        assert line["active"] == v2.version and line["level"] == "error"
        assert v3.version not in scorer.logs()

        registry.activate(v3.version)  # the operator's fix
        scorer.wait_serving(20)
        assert _score(scorer) == v3.version
    finally:
        scorer.stop()


def test_no_demo_model_is_trained_outside_the_embedded_mode(tmp_path: Path) -> None:
    configured = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    assert not bootstrap.demo_model_allowed(configured)
    assert bootstrap.ensure_model(configured) is None  # at once: nothing trained
    assert bootstrap.registry(configured).list() == []
    assert bootstrap.demo_model_allowed(Settings(data_dir=tmp_path))
    assert bootstrap.demo_model_allowed(configured.model_copy(update={"demo_model": True}))
