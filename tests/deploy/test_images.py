"""The slim CPU image (xgboost-cpu) and the GPU image (full xgboost) from one Dockerfile: both start,
as non-root on a read-only root filesystem, and score (the GPU image on the CPU when it sees no GPU).
Their sizes are printed as JSON (`pytest -s`). Only with FRAUDSCORE_DOCKER_TESTS=1 (`make compose-test`)."""

from __future__ import annotations

import json
import secrets
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from tests.deploy.conftest import ENABLED, run
from tests.servers.common import free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not ENABLED, reason="deployment test: FRAUDSCORE_DOCKER_TESTS=1 (make compose-test)"),
]


def test_image_sizes(images, record_property):
    print(json.dumps({"image_bytes": images, "image_mb": {k: round(v / 1e6) for k, v in images.items()}}))
    record_property("image_bytes", images)
    # the point of the slim target: xgboost's CUDA kernels and NCCL (~700 MB) are not in it
    assert images["gpu"] - images["cpu"] > 500_000_000, images


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_help_runs_without_the_source_tree(images, target):
    out = run(["docker", "run", "--rm", "--read-only", f"fraudscore:{target}", "--help"]).stdout
    assert "serve" in out and "nightly" in out


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_xgboost_flavour(images, target):
    code = "import importlib.metadata as m, json, xgboost; print(json.dumps(sorted(d.metadata['Name'] for d in" \
           " m.distributions() if d.metadata['Name'].startswith(('xgboost', 'nvidia')))))"
    out = run(["docker", "run", "--rm", "--read-only", "--entrypoint", "python", f"fraudscore:{target}", "-c", code]).stdout
    names = set(json.loads(out.strip().splitlines()[-1]))
    if target == "cpu":
        assert "xgboost-cpu" in names and "xgboost" not in names and not any(n.startswith("nvidia") for n in names)
    else:
        assert "xgboost" in names and "xgboost-cpu" not in names


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_serves_and_scores_on_cpu(images, target):
    """The embedded mode (SQLite, in-process valkey, demo model) in the image, read-only root, /app/var a volume."""
    port = free_port()
    name = f"fraudscore-image-test-{target}-{secrets.token_hex(3)}"
    run(["docker", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:50051",
         "-e", "FRAUDSCORE_DEMO_MODEL=true", f"fraudscore:{target}", "serve"])
    try:
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline:
            status = run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", name]).stdout.strip()
            if status == "running healthy" or not status.startswith("running"):
                break
            time.sleep(3)
        assert status == "running healthy", (status, run(["docker", "logs", "--tail", "80", name], check=False).stderr)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            tx = scoring_pb2.Transaction(transaction_id="img-1", customer_id="c-1", terminal_id="t-1", amount=75.0)
            resp = scoring_pb2_grpc.FraudScoringStub(channel).Score(scoring_pb2.ScoreRequest(transaction=tx), timeout=10)
        assert resp.source == scoring_pb2.MODEL and resp.model_version
        assert resp.decision in (scoring_pb2.APPROVE, scoring_pb2.REVIEW, scoring_pb2.DECLINE)
        user = run(["docker", "inspect", "-f", "{{.Config.User}}", name]).stdout.strip()
        assert user == "fraudscore"
    finally:
        run(["docker", "rm", "-f", "-v", name], check=False)
