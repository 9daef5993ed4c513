"""Shadow, canary, promote and rollback against a real `fraudscore serve` and its registry.

The versions beside the active one reuse its artifact: the shadow with far lower thresholds (so its
decisions differ: flips to count), the canary as it is (its answers are told apart by their version).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.online.scorer import in_canary
from scoring_service.protos import scoring_pb2
from tests.e2e.test_metrics import scrape, total
from tests.servers.common import REPO_ROOT, free_port
from tests.servers.scorer import ScorerProcess

CANARY_SHARE = 0.5


def _copy(record: ModelRecord, registry: Registry, version: str, thresholds: dict[str, float]) -> ModelRecord:
    return registry.register(version=version, framework=record.framework, artifact_path=record.artifact_path,
                             sha256=record.sha256, feature_names=record.feature_names, thresholds=thresholds,
                             policy=record.policy, params=record.params, description="e2e copy")


@pytest.fixture(scope="module")
def rollout(model_data_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    data_dir = tmp_path_factory.mktemp("fs-rollout")
    trained = open_registry(Settings(data_dir=model_data_dir)).active()
    assert trained is not None
    registry = open_registry(Settings(data_dir=data_dir))  # a registry of its own: other tests keep theirs
    active = _copy(trained, registry, f"active-{uuid.uuid4().hex[:6]}", trained.thresholds)
    active = registry.activate(active.version)
    canary = _copy(active, registry, f"canary-{uuid.uuid4().hex[:6]}", active.thresholds)
    # registered last: the newest never-active shadow version is the one shadow-scored
    shadow = _copy(active, registry, f"shadow-{uuid.uuid4().hex[:6]}", {"review": 1e-6, "decline": 2e-6})
    port = free_port()
    env = {"FRAUDSCORE_REGISTRY_POLL_S": "0.3", "FRAUDSCORE_REDIS_TIMEOUT_MS": "80", "FRAUDSCORE_METRICS_PORT": str(port),
           "FRAUDSCORE_LOG_REQUESTS": "false", "FRAUDSCORE_AUTH": "off", "FRAUDSCORE_MAX_QUEUE_MS": "0",
           "FRAUDSCORE_SHADOW_SHARE": "1.0", "FRAUDSCORE_CANARY_SHARE": str(CANARY_SHARE)}
    proc = ScorerProcess(data_dir, redis_url, env=env).start(timeout=240)  # a loaded CI box starts slowly
    yield {"proc": proc, "port": port, "registry": registry, "active": active, "shadow": shadow, "canary": canary,
           "data_dir": data_dir}
    proc.stop()


def eventually(check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def cli(data_dir: object, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(data_dir), "FRAUDSCORE_LOG_FORMAT": "json"}
    env.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", "model", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def score_many(proc: ScorerProcess, customers: list[str]) -> list[scoring_pb2.ScoreResponse]:
    with grpc.insecure_channel(proc.address) as channel, ThreadPoolExecutor(8) as pool:
        stub = proc.stub(channel)
        return list(pool.map(lambda c: stub.Score(scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
            transaction_id=uuid.uuid4().hex, customer_id=c, terminal_id="17", amount=42.0)), timeout=5), customers))


def test_the_shadow_scores_every_answer_in_the_background_and_counts_flips(rollout: dict[str, object]) -> None:
    proc, port, shadow = rollout["proc"], rollout["port"], rollout["shadow"]
    assert isinstance(proc, ScorerProcess) and isinstance(port, int) and isinstance(shadow, ModelRecord)
    eventually(lambda: total(scrape(port)["fraudscore_model_version_info"], role="shadow", version=shadow.version) == 1)
    answers = score_many(proc, [f"s-{uuid.uuid4().hex[:10]}" for _ in range(120)])
    assert all(a.model_version != shadow.version for a in answers)  # the shadow never answers

    def settled() -> bool:
        m = scrape(port)
        return total(m["fraudscore_shadow_scored_total"]) + total(m["fraudscore_shadow_dropped_total"]) >= 120

    eventually(settled)
    m = scrape(port)
    scored = total(m["fraudscore_shadow_scored_total"], version=shadow.version)
    assert scored + total(m["fraudscore_shadow_dropped_total"]) == 120
    assert scored > 0
    declined = sum(1 for a in answers if a.decision == scoring_pb2.DECLINE)
    # its thresholds decline nearly everything: every answer that was not a DECLINE flips
    assert total(m["fraudscore_shadow_decision_flips_total"], version=shadow.version, shadow="DECLINE") > 0
    assert total(m["fraudscore_shadow_score_diff_count"], version=shadow.version) == scored
    report = cli(rollout["data_dir"], "shadow-report", "--metrics", f"127.0.0.1:{port}", "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["versions"][shadow.version]["scored"] == scored
    assert summary["versions"][shadow.version]["flips"] <= scored - 0 and declined <= len(answers)


def test_a_canary_answers_its_share_of_cards_then_is_promoted_and_rolled_back(rollout: dict[str, object]) -> None:
    proc, port, data_dir = rollout["proc"], rollout["port"], rollout["data_dir"]
    active, canary, registry = rollout["active"], rollout["canary"], rollout["registry"]
    assert isinstance(proc, ScorerProcess) and isinstance(port, int) and isinstance(registry, Registry)
    assert isinstance(active, ModelRecord) and isinstance(canary, ModelRecord)

    registry.set_status(canary.version, "canary")  # `fraudscore model canary VERSION --direct`: tested below
    eventually(lambda: total(scrape(port)["fraudscore_model_version_info"], role="canary", version=canary.version) == 1)
    customers = [f"c-{uuid.uuid4().hex[:10]}" for _ in range(200)]
    answers = score_many(proc, customers + customers[:20])  # a card stays with its version
    expected = [canary.version if in_canary(c, CANARY_SHARE) else active.version for c in customers + customers[:20]]
    assert [a.model_version for a in answers] == expected
    assert 40 < expected.count(canary.version) < 180
    assert all(a.source == scoring_pb2.MODEL for a in answers if a.model_version == canary.version)

    promoted = cli(data_dir, "promote", "--direct")
    assert promoted.returncode == 0, promoted.stderr
    current = registry.active()
    assert current is not None and current.version == canary.version
    assert registry.audit_log(5)[0].action == "promote"
    outsider = next(c for c in (f"o-{i}" for i in range(1000)) if not in_canary(c, CANARY_SHARE))
    eventually(lambda: score_many(proc, [outsider])[0].model_version == canary.version)

    rolled = cli(data_dir, "rollback", "--direct")
    assert rolled.returncode == 0, rolled.stderr
    current = registry.active()
    assert current is not None and current.version == active.version
    last = registry.audit_log(5)[0]  # `model rollback --direct` (cli/models.py) audits its re-activation
    assert last.subject == active.version and last.action in ("rollback", "activate")
    eventually(lambda: score_many(proc, [outsider])[0].model_version == active.version)


def test_end_canary_sends_every_card_back_to_the_active_version(rollout: dict[str, object]) -> None:
    proc, data_dir, registry, active = rollout["proc"], rollout["data_dir"], rollout["registry"], rollout["active"]
    assert isinstance(proc, ScorerProcess) and isinstance(registry, Registry) and isinstance(active, ModelRecord)
    current = registry.active()
    assert current is not None
    spare = _copy(current, registry, f"canary2-{uuid.uuid4().hex[:6]}", current.thresholds)
    started = cli(data_dir, "canary", spare.version, "--direct")
    assert started.returncode == 0, started.stderr
    insider = next(c for c in (f"i-{i}" for i in range(1000)) if in_canary(c, CANARY_SHARE))
    eventually(lambda: score_many(proc, [insider])[0].model_version == spare.version)
    ended = cli(data_dir, "end-canary", "--direct")
    assert ended.returncode == 0, ended.stderr
    assert registry.get(spare.version).status == "retired"
    eventually(lambda: score_many(proc, [insider])[0].model_version == current.version)
