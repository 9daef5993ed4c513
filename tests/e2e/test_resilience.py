"""Budget, degraded dependencies, modes and model hot-swap, against real processes."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import grpc
import pytest

from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.protos import scoring_pb2
from tests.e2e.test_score_grpc import new_customer, request, written_back
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e

BUDGET_MS = 100


def _copy_registry(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_redis_stopped_or_frozen_requests_still_succeed_within_budget(model_data_dir, active_model, own_redis, tmp_path):
    scorer = ScorerProcess(model_data_dir, own_redis.url, env={"FRAUDSCORE_BUDGET_MS": str(BUDGET_MS)}).start()
    try:
        with grpc.insecure_channel(scorer.address) as ch:
            stub = scorer.stub(ch)
            customer = new_customer()
            assert stub.Score(request(customer), timeout=2).source == scoring_pb2.MODEL
            assert written_back(own_redis.url, active_model.version, customer) is not None

            own_redis.pause()  # frozen: connections accepted, nothing answered
            # The deadline below is the budget plus slack for a loaded CI machine: an answer at all
            # (rather than DEADLINE_EXCEEDED) proves no request waits on the frozen Redis.
            frozen = [stub.Score(request(customer), timeout=BUDGET_MS / 1000 + 0.9) for _ in range(10)]
            assert all(r.degraded for r in frozen)
            assert all(r.source in (scoring_pb2.MODEL, scoring_pb2.FALLBACK) for r in frozen)
            assert all(r.latency_ms <= BUDGET_MS for r in frozen)
            own_redis.resume()

            own_redis.stop()  # gone: connection refused
            down = [stub.Score(request(new_customer()), timeout=BUDGET_MS / 1000 + 0.9) for _ in range(20)]
            assert all(r.degraded and r.source == scoring_pb2.MODEL for r in down)
            assert all(r.latency_ms <= BUDGET_MS for r in down)
    finally:
        scorer.stop()
    assert "redis.breaker_open" in scorer.logs()


def test_always_model_mode_runs_the_model_for_known_customers(model_data_dir, redis_url):
    scorer = ScorerProcess(model_data_dir, redis_url, args=["--mode", "always-model"]).start()
    try:
        with grpc.insecure_channel(scorer.address) as ch:
            stub = scorer.stub(ch)
            customer = new_customer()
            stub.Score(request(customer), timeout=2)
            time.sleep(0.3)  # the entry is written back by now
            answers = [stub.Score(request(customer), timeout=2) for _ in range(3)]
            assert all(a.source == scoring_pb2.MODEL for a in answers)
    finally:
        scorer.stop()


def test_new_active_model_is_picked_up_and_a_tampered_one_is_refused(model_data_dir, redis_url, tmp_path):
    data_dir = _copy_registry(model_data_dir, tmp_path / "data")
    settings = Settings(data_dir=data_dir)
    registry = open_registry(settings)
    first = registry.active()
    assert first is not None
    # Copies of the artifact registered as two more versions: one intact, one whose bytes change.
    versions = {}
    for name in ("good", "tampered"):
        artifact = data_dir / f"{name}-{Path(first.artifact_path).name}"
        shutil.copy(first.artifact_path, artifact)
        versions[name] = registry.register(
            version=f"xgb-{name}-{uuid.uuid4().hex[:6]}", framework=first.framework, artifact_path=str(artifact),
            sha256=first.sha256, feature_names=first.feature_names, thresholds=first.thresholds,
            policy=first.policy, metrics=first.metrics,
        )
    scorer = ScorerProcess(data_dir, redis_url, env={"FRAUDSCORE_REGISTRY_POLL_S": "0.3"}).start()
    try:
        with grpc.insecure_channel(scorer.address) as ch:
            stub = scorer.stub(ch)
            assert stub.Score(request(new_customer()), timeout=2).model_version == first.version

            registry.activate(versions["good"].version)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                resp = stub.Score(request(new_customer()), timeout=2)
                if resp.model_version == versions["good"].version:
                    break
                time.sleep(0.1)
            assert resp.model_version == versions["good"].version

            with open(versions["tampered"].artifact_path, "ab") as f:
                f.write(b" ")
            registry.activate(versions["tampered"].version)
            time.sleep(1.5)  # several registry polls
            answers = [stub.Score(request(new_customer()), timeout=2) for _ in range(5)]
            assert all(a.model_version == versions["good"].version for a in answers)
    finally:
        scorer.stop()
    assert "model.refused" in scorer.logs() and "sha256" in scorer.logs()


def test_prometheus_metrics_count_answers_by_source(model_data_dir, redis_url):
    import urllib.request

    from tests.servers.common import free_port

    port = free_port()
    scorer = ScorerProcess(model_data_dir, redis_url, env={"FRAUDSCORE_METRICS_PORT": str(port)}).start()
    try:
        with grpc.insecure_channel(scorer.address) as ch:
            stub = scorer.stub(ch)
            for _ in range(3):
                stub.Score(request(new_customer()), timeout=2)
            with pytest.raises(grpc.RpcError):
                stub.Score(request(new_customer(), amount=-1.0), timeout=2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        scorer.stop()
    model_lines = [ln for ln in text.splitlines() if ln.startswith("fraudscore_scores_total{") and 'source="MODEL"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in model_lines) == 3
    assert "fraudscore_invalid_requests_total 1.0" in text
    assert 'fraudscore_score_latency_seconds_count{source="MODEL"} 3.0' in text
