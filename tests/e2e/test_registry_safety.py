"""The registry at start: a damaged active artifact does not keep the service down; no demo model in production."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import grpc
import pytest

from scoring_service import bootstrap
from scoring_service.adapters.model.gbdt import sha256_file
from scoring_service.config import Settings
from scoring_service.protos import scoring_pb2
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e


def test_a_damaged_active_artifact_falls_back_to_the_newest_good_version_loudly(model_data_dir: Path, redis_url: str,
                                                                                tmp_path: Path) -> None:
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


def test_no_demo_model_is_trained_outside_the_embedded_mode(tmp_path: Path) -> None:
    configured = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    assert not bootstrap.demo_model_allowed(configured)
    assert bootstrap.ensure_model(configured) is None  # at once: nothing trained
    assert bootstrap.registry(configured).list() == []
    assert bootstrap.demo_model_allowed(Settings(data_dir=tmp_path))
    assert bootstrap.demo_model_allowed(configured.model_copy(update={"demo_model": True}))
