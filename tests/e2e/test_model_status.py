"""``fraudscore model status``: the registry's active version against what running servers serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scoring_service import bootstrap
from scoring_service.adapters.model.gbdt import sha256_file
from scoring_service.config import Settings
from tests.servers.common import REPO_ROOT, free_port
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e


def status(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(data_dir), "FRAUDSCORE_LOG_FORMAT": "json"}
    env.pop("FRAUDSCORE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", "model", "status", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_model_status_says_what_serves_and_exits_1_on_a_mismatch(model_data_dir: Path, redis_url: str,
                                                                   tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = bootstrap.registry(Settings(data_dir=data_dir))
    good = registry.active()
    assert good is not None

    alone = status(data_dir)  # no server given: the registry's side only
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.splitlines()[0] == f"registry active: {good.version}"
    assert "mismatch: unknown" in alone.stdout

    metrics = free_port()
    scorer = ScorerProcess(data_dir, redis_url, env={"FRAUDSCORE_METRICS_PORT": str(metrics),
                                                     "FRAUDSCORE_REGISTRY_POLL_S": "0.3"})
    server = f"127.0.0.1:{metrics}"
    try:
        scorer.start()
        ok = status(data_dir, "--metrics", server)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.splitlines() == [f"registry active: {good.version}", f"serving {server}: {good.version}",
                                          "mismatch: no"]

        # A new active version whose artifact is damaged after registration: the server refuses it and
        # keeps serving the good one; the status says so and exits 1.
        artifact = data_dir / "damaged" / Path(good.artifact_path).name
        artifact.parent.mkdir()
        shutil.copy(good.artifact_path, artifact)
        bad = registry.register(version=good.version + "-damaged", framework=good.framework, artifact_path=artifact,
                                sha256=sha256_file(artifact), feature_names=good.feature_names,
                                thresholds=good.thresholds, policy=good.policy, activate=True)
        with artifact.open("ab") as f:
            f.write(b"\x00garbage")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and '"model.refused"' not in scorer.logs():
            time.sleep(0.2)
        time.sleep(0.5)  # the next poll has set the gauges
        mismatch = status(data_dir, "--metrics", server)
        assert mismatch.returncode == 1, mismatch.stdout + mismatch.stderr
        assert mismatch.stdout.splitlines() == [f"registry active: {bad.version}", f"serving {server}: {good.version}",
                                                "mismatch: yes"]
        as_json = status(data_dir, "--metrics", server, "--json")
        assert as_json.returncode == 1
        report = json.loads(as_json.stdout)
        assert report["registry_active"] == bad.version and report["mismatch"] is True
        assert report["servers"][0]["serving"] == good.version and report["servers"][0]["mismatch_gauge"] is True
    finally:
        scorer.stop()

    gone = status(data_dir, "--metrics", server)  # nothing answers there any more: a clear error, not a traceback
    assert gone.returncode == 1 and "no metrics at" in gone.stderr and "Traceback" not in gone.stderr
