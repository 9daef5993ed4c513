"""Callers must authenticate (issue 14): API keys with scopes, per-key rate limits shared by the
workers through Redis, the admin RPC audited with the caller's identity, health open for probes;
a ScoreBatch costs its payments and failed authentication is limited per address (issue 21).

One real `fraudscore serve --workers 2` with TLS and FRAUDSCORE_AUTH=required on its own SQLite
registry (the e2e model's artifact registered twice), a real Redis, and the real CLI.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner, Result

from scoring_service.adapters.sql.keys import KeyStore
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.bootstrap import key_store, registry
from scoring_service.config import Settings
from scoring_service.online.auth import FAILED_AUTH_BURST, FAILED_AUTH_PER_S
from scoring_service.protos import admin_pb2, admin_pb2_grpc, scoring_pb2
from tests.servers.certs import TestCA
from tests.servers.common import free_port
from tests.servers.scorer import ScorerProcess

PEPPER = "test-pepper-0123456789abcdef"
V2 = "e2e-security-b"


def _score(n: int = 1) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(request_id=f"sec-{n}", transaction=scoring_pb2.Transaction(
        transaction_id=f"sec-tx-{n}", customer_id=f"sec-c-{n}", terminal_id="17", amount=12.5))


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are free: worker i of ``--workers 2`` serves its metrics on P + i."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _metric(server: ScorerProcess, name: str, **labels: str) -> float:
    """The sum over both workers' metrics endpoints of the samples ``name`` with ``labels``."""
    first = int(server.env["FRAUDSCORE_METRICS_PORT"])
    value = 0.0
    for port in (first, first + 1):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        for family in text_string_to_metric_families(body):
            value += sum(s.value for s in family.samples
                         if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    return value


@pytest.fixture(scope="module")
def sec_dir(tmp_path_factory: pytest.TempPathFactory, active_model: ModelRecord) -> Path:
    """A data folder whose registry holds the e2e model's artifact twice (active + shadow)."""
    data_dir = tmp_path_factory.mktemp("fs-security")
    reg = registry(Settings(data_dir=data_dir))
    for version, activate in ((active_model.version, True), (V2, False)):
        reg.register(version=version, framework=active_model.framework, artifact_path=active_model.artifact_path,
                     sha256=active_model.sha256, feature_names=active_model.feature_names,
                     thresholds=active_model.thresholds, policy=active_model.policy, activate=activate)
    return data_dir


@pytest.fixture(scope="module")
def keys(sec_dir: Path) -> KeyStore:
    return key_store(Settings(data_dir=sec_dir, key_pepper=PEPPER))


@pytest.fixture(scope="module")
def ca(sec_dir: Path) -> TestCA:
    return TestCA(sec_dir / "pki")


@pytest.fixture(scope="module")
def server(sec_dir: Path, redis_url: str, ca: TestCA) -> Iterator[ScorerProcess]:
    cert, key, _ = ca.issue("server", "localhost", server=True)
    env = {"FRAUDSCORE_AUTH": "required", "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_TLS_CERT": str(cert),
           "FRAUDSCORE_TLS_KEY": str(key), "FRAUDSCORE_AUTH_CACHE_TTL_S": "0.5", "FRAUDSCORE_REGISTRY_POLL_S": "0.5",
           "FRAUDSCORE_REDIS_TIMEOUT_MS": "200", "FRAUDSCORE_DRAIN_S": "0",
           "FRAUDSCORE_METRICS_PORT": str(_two_free_ports()),
           # not about overload: the queueing bound would refuse calls delayed by a busy test machine
           "FRAUDSCORE_MAX_QUEUE_MS": "0"}
    # two workers load the model side by side: slow on a small, shared CI machine
    proc = ScorerProcess(sec_dir, redis_url, env=env, args=["--workers", "2"], tls_ca=ca.ca_path).start(timeout=300)
    yield proc
    proc.stop()


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """The real ``fraudscore`` command line, run in this process (a subprocess spends ~5 s importing)."""
    from scoring_service.cli import app

    full_env = {"FRAUDSCORE_DATA_DIR": str(data_dir), "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_LOG_FORMAT": "json",
                "FRAUDSCORE_API_KEY": None, **(env or {})}
    return CliRunner().invoke(app, list(args), env=full_env, catch_exceptions=False)


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_key_created_with_the_cli_is_shown_once_and_scores(server: ScorerProcess, sec_dir: Path) -> None:
    created = cli(sec_dir, "keys", "create", "--owner", "payments-team", "--scope", "score", "--json")
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)["key"]
    assert key.startswith("fsk_") and len(key) > 40
    with server.channel() as ch:
        answer = server.stub(ch).Score(_score(1), metadata=(("x-api-key", key),), timeout=10)
    assert answer.decision in (scoring_pb2.APPROVE, scoring_pb2.REVIEW, scoring_pb2.DECLINE)
    listed = cli(sec_dir, "keys", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert "payments-team" in listed.stdout and key not in listed.stdout and key[4:20] not in listed.stdout


def test_no_key_or_an_unknown_key_is_unauthenticated_and_health_stays_open(server: ScorerProcess) -> None:
    with server.channel() as ch:
        stub = server.stub(ch)
        assert code_of(stub.Score, _score(), timeout=10) == grpc.StatusCode.UNAUTHENTICATED
        batch = scoring_pb2.ScoreBatchRequest(requests=[_score(2)])
        assert code_of(stub.ScoreBatch, batch, timeout=10) == grpc.StatusCode.UNAUTHENTICATED
        forged = "fsk_" + "A" * 43
        assert code_of(stub.Score, _score(), metadata=(("x-api-key", forged),), timeout=10) \
            == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_clients_are_refused_on_the_tls_port(server: ScorerProcess, keys: KeyStore) -> None:
    _, key = keys.create("plaintext-caller", ["score"])
    with grpc.insecure_channel(server.address) as ch:
        assert code_of(server.stub(ch).Score, _score(), metadata=(("x-api-key", key),), timeout=5) \
            == grpc.StatusCode.UNAVAILABLE


def test_a_key_without_the_scope_is_permission_denied(server: ScorerProcess, keys: KeyStore) -> None:
    _, score_key = keys.create("scorer-only", ["score"])
    _, admin_key = keys.create("admin-only", ["admin"])
    request = admin_pb2.SetModelStatusRequest(version=V2, status="retired")
    with server.channel() as ch:
        admin = admin_pb2_grpc.ModelAdminStub(ch)
        assert code_of(admin.SetModelStatus, request, metadata=(("x-api-key", score_key),), timeout=10) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(server.stub(ch).Score, _score(), metadata=(("x-api-key", admin_key),), timeout=10) \
            == grpc.StatusCode.PERMISSION_DENIED
    assert Registry(keys.engine).get(V2).status == "shadow"  # nothing changed


def test_a_revoked_key_is_refused(server: ScorerProcess, keys: KeyStore, sec_dir: Path) -> None:
    principal, key = keys.create("leaver", ["score"])
    md = (("x-api-key", key),)
    with server.channel() as ch:
        stub = server.stub(ch)
        assert code_of(stub.Score, _score(3), metadata=md, timeout=10) == grpc.StatusCode.OK
        revoked = cli(sec_dir, "keys", "revoke", str(principal.key_id))
        assert revoked.exit_code == 0, revoked.output
        deadline = time.monotonic() + 30  # the servers' lookup cache lives 0.5 s here
        code = grpc.StatusCode.OK
        while code == grpc.StatusCode.OK and time.monotonic() < deadline:
            code = code_of(stub.Score, _score(4), metadata=md, timeout=10)
            time.sleep(0.1)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # and it stays refused on every connection, hence on both workers
        for _ in range(4):
            with server.channel(**{"grpc.use_local_subchannel_pool": 1}) as fresh:
                assert code_of(server.stub(fresh).Score, _score(5), metadata=md, timeout=10) \
                    == grpc.StatusCode.UNAUTHENTICATED


def test_the_rate_limit_is_one_bucket_shared_by_both_workers(server: ScorerProcess, keys: KeyStore) -> None:
    burst = 10
    principal, key = keys.create("bursty", ["score"], rate_per_s=0.01, burst=burst)  # ~no refill during the test
    md = (("x-api-key", key),)
    channels = [server.channel(**{"grpc.use_local_subchannel_pool": 1}) for _ in range(8)]  # connections spread
    ok, pushbacks, other = 0, [], []
    try:
        for i in range(48):
            try:
                server.stub(channels[i % 8]).Score(_score(100 + i), metadata=md, timeout=10)
                ok += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    pushbacks.append(dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms"))
                else:
                    other.append(exc.code())
    finally:
        for ch in channels:
            ch.close()
    assert other == []
    # One bucket of 10 for the key, wherever the call lands; a bucket per worker would let up to 20 through.
    assert burst <= ok <= burst + 1, (principal.key_id, ok, pushbacks)
    assert len(pushbacks) == 48 - ok and all(p is not None and int(p) > 0 for p in pushbacks)
    refusing = {e["pid"] for e in server.log_events("auth.refused") if e.get("reason") == "rate"}
    assert len(refusing) == 2, f"both workers should have refused calls of the key: {refusing}"


def test_registry_changes_go_through_the_admin_rpc_audited_with_the_key_owner(
    server: ScorerProcess, keys: KeyStore, sec_dir: Path, ca: TestCA, active_model: ModelRecord
) -> None:
    principal, key = keys.create("release-manager", ["admin"])
    reg = Registry(keys.engine)
    spoof = {"LOGNAME": "mallory", "USER": "mallory", "FRAUDSCORE_API_KEY": ""}
    activated = cli(sec_dir, "model", "activate", V2, "--server", server.address, "--tls-ca", str(ca.ca_path),
                    "--api-key", key, env=spoof)
    assert activated.exit_code == 0, activated.output
    assert reg.active().version == V2  # type: ignore[union-attr]
    with server.channel() as ch:
        answer = admin_pb2_grpc.ModelAdminStub(ch).Rollback(admin_pb2.RollbackRequest(),
                                                            metadata=(("x-api-key", key),), timeout=30)
    assert answer.version == active_model.version and answer.previous_active == V2
    assert reg.active().version == active_model.version  # type: ignore[union-attr]
    audit = reg.audit_log(limit=5)
    expected = f"key:{principal.key_id}:release-manager"
    assert [(e.action, e.subject, e.actor) for e in audit[:2]] == [
        ("rollback", active_model.version, expected), ("activate", V2, expected)]
    assert all("mallory" not in e.actor for e in audit)
    # without --server or --direct the CLI refuses; --direct is audited as the local uid, never $LOGNAME
    refused = cli(sec_dir, "model", "shadow", V2)
    assert refused.exit_code == 2 and "--direct" in refused.output
    direct = cli(sec_dir, "model", "shadow", V2, "--direct", env=spoof)
    assert direct.exit_code == 0, direct.output
    assert reg.audit_log(limit=1)[0].actor == f"local:{os.getuid()}"


def test_a_backtest_through_the_service_sends_its_key_over_tls(
        server: ScorerProcess, keys: KeyStore, sec_dir: Path, ca: TestCA, tmp_path: Path) -> None:
    """`fraudscore replay --through-service` against a server that requires TLS and keys: with
    --tls-ca and the key from the environment every call is answered; without the key every call
    is refused (UNAUTHENTICATED) and the command exits 1."""
    from scoring_service.training.simulator import simulate

    events = tmp_path / "events.parquet"
    simulate(40, 30, "2018-08-01", 2, seed=5).head(60).to_parquet(events)
    _, key = keys.create(owner="backtests", scopes=["score"])
    assert key
    args = ("replay", "--through-service", f"localhost:{server.port}", "--from", "2018-08-01", "--to", "2018-08-03",
            "--source", str(events), "--tls-ca", str(ca.ca_path), "--json")
    ok = cli(sec_dir, *args, env={"FRAUDSCORE_API_KEY": key})
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert report["requests"] > 0 and report["errors"] == 0, report  # the window's payments, every one answered
    refused = cli(sec_dir, *args)
    assert refused.exit_code == 1 and "failed" in refused.output, refused.output


def test_score_batch_costs_its_payments_so_a_key_gets_at_most_its_rate_by_any_mix(
        server: ScorerProcess, keys: KeyStore) -> None:
    """Issue 21 (5): a ScoreBatch used to cost ``min(items, burst)`` tokens, so batches larger than
    the burst were scored at several times the key's rate. For a few seconds a key of 20/s (burst
    10) sends, in turn, a Score, a ScoreBatch of its burst and one of four times its burst, each
    sent again after the pushback while refused for the rate (as fraudscore_client does): the
    payments scored stay within the bucket's bound (burst + rate x time), and the oversized batches
    are refused at once with INVALID_ARGUMENT naming the burst (retrying them could never succeed)."""
    rate, burst, seconds = 20.0, 10, 3.0
    _, key = keys.create("batcher", ["score"], rate_per_s=rate, burst=burst)
    md = (("x-api-key", key),)
    scored, codes, oversized, sent_oversized = 0, Counter[str](), [], 0
    with server.channel() as ch:
        stub = server.stub(ch)

        def send(items: int, n: int) -> int:
            if items == 1:
                stub.Score(_score(n), metadata=md, timeout=10)
                return 1
            batch = scoring_pb2.ScoreBatchRequest(requests=[_score(n + j) for j in range(items)])
            return len(stub.ScoreBatch(batch, metadata=md, timeout=10).responses)

        start, i = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            items = (1, burst, 4 * burst)[i % 3]
            sent_oversized += items > burst
            while True:
                try:
                    scored += send(items, 10_000 + 100 * i)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        time.sleep(int(dict(exc.trailing_metadata() or ())["grpc-retry-pushback-ms"]) / 1000.0)
                        continue
                    if items > burst:
                        oversized.append((exc.code(), exc.details()))
                break
            i += 1
        elapsed = time.monotonic() - start
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}, codes
    # one bucket for the key (both workers): never more than it holds plus what refilled meanwhile
    assert burst <= scored <= burst + rate * elapsed + 1, (scored, elapsed, codes)
    assert len(oversized) == sent_oversized > 0, codes
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT and f"burst of {burst}" in details
               for code, details in oversized), oversized


def test_a_flood_of_wrong_keys_from_one_address_is_refused_past_its_budget_and_good_keys_still_score(
        server: ScorerProcess, keys: KeyStore) -> None:
    """Issue 21 (6): a wrong key cost a thread hop and a SQL lookup, unlimited. One connection (one
    worker) sends 600 random well-formed keys, 16 in flight, with a good key's call every 40: the
    address gets UNAUTHENTICATED for at most its failure budget (burst + rate x time, in that
    worker), then RESOURCE_EXHAUSTED without a lookup, counted; the good key is answered OK
    throughout, although its lookup expires (0.5 s here) and is made again during the flood. Once
    the flood stops, a key new to the server is looked up again after the pushback.

    Last in this file: it spends 127.0.0.1's budget in one worker (the wait at the end refills it)."""
    time.sleep(FAILED_AUTH_BURST / FAILED_AUTH_PER_S)  # a full budget, whatever failed before (the backtest's)
    _, good = keys.create("neighbour", ["score"])
    good_md = (("x-api-key", good),)
    n, in_flight = 600, 16
    codes, good_codes, details, pushbacks = Counter[str](), [], set(), []
    with server.channel() as ch:
        stub = server.stub(ch)
        assert code_of(stub.Score, _score(2000), metadata=good_md, timeout=10) == grpc.StatusCode.OK
        refused_before = _metric(server, "fraudscore_auth_refused_total", reason="failure_budget")
        lookups_before = _metric(server, "fraudscore_auth_lookups_total")
        pending: list = []

        def settle(call: grpc.Future) -> None:
            try:
                call.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                details.add(exc.details())
                pushbacks.append(dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms"))

        start = time.monotonic()
        for i in range(n):
            wrong = (("x-api-key", "fsk_" + secrets.token_urlsafe(32)),)
            pending.append(stub.Score.future(_score(3000 + i), metadata=wrong, timeout=10))
            if len(pending) >= in_flight:
                settle(pending.pop(0))
            if i % 40 == 0:
                good_codes.append(code_of(stub.Score, _score(5000 + i), metadata=good_md, timeout=10))
        for call in pending:
            settle(call)
        elapsed = time.monotonic() - start
        refused = _metric(server, "fraudscore_auth_refused_total", reason="failure_budget") - refused_before
        lookups = _metric(server, "fraudscore_auth_lookups_total") - lookups_before
        assert good_codes == [grpc.StatusCode.OK] * len(good_codes)
        assert set(codes) == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, codes
        budget = FAILED_AUTH_BURST + FAILED_AUTH_PER_S * elapsed + 1
        assert codes["UNAUTHENTICATED"] <= budget, (codes, elapsed)
        assert refused == codes["RESOURCE_EXHAUSTED"] >= n - budget, (refused, codes)
        # the wrong keys' lookups are within the budget too (the good key's revalidations add a few)
        assert lookups <= budget + len(good_codes), (lookups, codes)
        assert "unknown API key" in details and any("failed authentications from 127.0.0.1" in d for d in details)
        waits = [int(p) for p in pushbacks if p is not None]
        assert len(waits) == codes["RESOURCE_EXHAUSTED"] and all(w > 0 for w in waits)
        time.sleep(max(waits) / 1000.0 + 0.05)
        _, fresh = keys.create("newcomer", ["score"])
        assert code_of(stub.Score, _score(9000), metadata=(("x-api-key", fresh),), timeout=10) == grpc.StatusCode.OK
    time.sleep(FAILED_AUTH_BURST / FAILED_AUTH_PER_S)  # a full budget again for whatever runs next
