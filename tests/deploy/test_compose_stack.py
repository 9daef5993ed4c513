"""`docker compose up` for real: the stack of docker-compose.yml from the project's own Dockerfile.

Builds the images (stand-ins for the third-party ones where no registry is reachable), starts the
stack with generated secrets, waits for health, scores through the published port, publishes
simulated payments to Kafka from inside the internal network, runs the ``nightly`` profile and
sees CACHE answers, checks the hardening (one published port, Redis password, non-root, read-only
root filesystems), then ``down -v``. Minutes: only with FRAUDSCORE_DOCKER_TESTS=1 (`make compose-test`).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from tests.deploy.conftest import ENABLED, run
from tests.servers.common import REPO_ROOT, free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not ENABLED, reason="deployment test: FRAUDSCORE_DOCKER_TESTS=1 (make compose-test)"),
]
SERVICES = ("redis", "kafka", "postgres", "scorer")


@dataclass
class Stack:
    compose: list[str]
    port: int
    env_file: Path
    redis_password: str  # the admin user's (deploy/redis/users.acl)
    api_key: str = ""

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.compose, *args], timeout=timeout, check=check, cwd=REPO_ROOT)

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str) -> dict:
        return json.loads(run(["docker", "inspect", self.container(service)]).stdout)[0]


def _health(stack: Stack, service: str) -> str:
    state = stack.inspect(service)["State"]
    if state["Status"] != "running":
        return str(state["Status"])
    if state.get("Health"):
        return str(state["Health"]["Status"])
    return str(state["Status"])


@pytest.fixture(scope="module")
def stack(docker_ready: list[str], images: dict[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("compose")
    env_file = folder / "stack.env"  # the secrets of this run, never in the repository
    redis_password = secrets.token_hex(16)
    port = free_port()
    env_file.write_text(
        f"REDIS_ADMIN_PASSWORD={redis_password}\nREDIS_SCORER_PASSWORD={secrets.token_hex(16)}\n"
        f"REDIS_NIGHTLY_PASSWORD={secrets.token_hex(16)}\nPOSTGRES_PASSWORD={secrets.token_hex(16)}\n"
        f"GRAFANA_ADMIN_PASSWORD={secrets.token_hex(16)}\nFRAUDSCORE_BIND=127.0.0.1\nFRAUDSCORE_PORT={port}\n"
        "FRAUDSCORE_TARGET=cpu\n"
    )
    project = f"fraudscore-test-{secrets.token_hex(3)}"
    compose = [*docker_ready, "-p", project, "--env-file", str(env_file), "-f", str(REPO_ROOT / "docker-compose.yml")]
    s = Stack(compose, port, env_file, redis_password)
    try:
        s("up", "-d", timeout=1200)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = {name: _health(s, name) for name in SERVICES}
            if all(v == "healthy" for v in states.values()):
                break
            # unhealthy may still turn healthy (a slow first start); a container that stopped will not
            assert not {v for v in states.values() if v in ("exited", "dead")}, states
            time.sleep(3)
        else:
            pytest.fail(f"stack not healthy after 600 s: {states}\n{s('logs', '--tail', '60', check=False).stdout}")
        # callers authenticate (FRAUDSCORE_AUTH defaults to required with a database and Redis): a key for the tests
        out = s("run", "--rm", "nightly", "keys", "create", "--owner", "compose-test", "--scope", "score", "--json").stdout
        s.api_key = next(json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{"))["key"]
        yield s
    finally:
        logs = s("logs", "--no-color", "--tail", "200", check=False, timeout=120).stdout
        (folder / "compose.log").write_text(logs)
        s("--profile", "nightly", "--profile", "observability", "down", "-v", "--remove-orphans", check=False, timeout=300)


def _score(stack: Stack, customer: str, terminal: str, amount: float, key: str | None = None) -> scoring_pb2.ScoreResponse:
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        tx = scoring_pb2.Transaction(transaction_id=f"tx-{customer}-{amount}", customer_id=customer,
                                     terminal_id=terminal, amount=amount)
        return scoring_pb2_grpc.FraudScoringStub(channel).Score(
            scoring_pb2.ScoreRequest(transaction=tx), timeout=10,
            metadata=[("x-api-key", stack.api_key if key is None else key)],
        )


def test_scorer_is_served_through_the_published_port(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    resp = _score(stack, "compose-newcomer", "compose-terminal", 42.0)
    assert resp.source == scoring_pb2.MODEL and resp.model_version
    assert resp.decision in (scoring_pb2.APPROVE, scoring_pb2.REVIEW, scoring_pb2.DECLINE)


def test_score_without_a_valid_key_is_refused(stack):
    with pytest.raises(grpc.RpcError) as err:
        _score(stack, "compose-newcomer", "compose-terminal", 42.0, key="not-a-key")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_scorer_port_is_published_and_only_on_loopback(stack):
    for name in ("redis", "kafka", "postgres"):
        assert not any(stack.inspect(name)["NetworkSettings"]["Ports"].get(p) for p in
                       stack.inspect(name)["NetworkSettings"]["Ports"]), name
    bindings = stack.inspect("scorer")["NetworkSettings"]["Ports"]["50051/tcp"]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    assert {b["HostPort"] for b in bindings} == {str(stack.port)}


def test_services_run_non_root_with_read_only_root_filesystems(stack):
    for name in SERVICES:
        info = stack.inspect(name)
        assert info["HostConfig"]["ReadonlyRootfs"] is True, name
        uid = stack("exec", "-T", name, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, (name, uid)
    probe = stack("exec", "-T", "scorer", "sh", "-c", "touch /app/probe", check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr


def test_compose_file_is_valid_for_compose_v2_and_docker_compose_1_29(stack):
    """Both Compose implementations accept the file (1.29 rejects a top-level `name:`): each one present is asked."""
    checked = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            run([*cmd, "--env-file", str(stack.env_file), "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"])
            checked.append(cmd[-1])
    assert checked


def test_redis_refuses_calls_without_the_password(stack):
    anonymous = stack("exec", "-T", "redis", "redis-cli", "ping", check=False)
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    authed = stack("exec", "-T", "-e", f"REDISCLI_AUTH={stack.redis_password}", "redis", "redis-cli", "--user", "admin",
                   "ping")
    assert authed.stdout.strip() == "PONG"


def test_events_then_the_nightly_profile_then_cache_answers(stack, tmp_path_factory):
    from scoring_service.training.simulator import simulate

    # Recent payments (ending ten days ago, so that labels stamped payment time + 7 days are not in
    # the future, which Kafka would refuse) inside the nightly's 30-day window before now.
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=40)).strftime("%Y-%m-%d")
    payments = simulate(n_customers=150, n_terminals=300, start_date=start, n_days=30, seed=5, card_testing_per_day=0.0)
    folder = tmp_path_factory.mktemp("events")
    folder.chmod(0o755)
    parquet = folder / "payments.parquet"
    payments.to_parquet(parquet)
    parquet.chmod(0o644)

    # Kafka is on the internal network only: publish from a one-off container of the image inside it.
    stack("run", "--rm", "-v", f"{folder}:/data:ro", "nightly", "events", "publish", "--parquet", "/data/payments.parquet",
          timeout=600)
    out = stack("--profile", "nightly", "run", "--rm", "nightly", "nightly", "--json", timeout=900).stdout
    report = next(json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{") and '"generation"' in line)
    assert report["status"] == "succeeded" and report["events_consumed"] >= len(payments), report
    assert report["keys_written"] > 0

    ts = pd.to_datetime(payments["TX_DATETIME"])
    window = payments.loc[ts >= pd.Timestamp.now() - pd.Timedelta(days=30)]
    known = window.drop_duplicates("CUSTOMER_ID").sample(6, random_state=3)
    # The scorer reads the active generation once a second (generation_poll_s): until then it still
    # reads the previous one. The first run here once scored the first card within that second (MODEL).
    time.sleep(2.0)
    for row in known.itertuples():
        resp = _score(stack, str(row.CUSTOMER_ID), str(row.TERMINAL_ID), float(row.TX_AMOUNT))
        assert resp.source == scoring_pb2.CACHE, (row.CUSTOMER_ID, resp)
        assert resp.model_version == report["model_version"]
    assert _score(stack, "never-paid-" + report["generation"], "t-0", 10.0).source == scoring_pb2.MODEL
