"""The client package against the real service (``fraudscore serve`` in a subprocess), and the CLI on top of it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner, Result

from fraudscore_client import AsyncFraudScoreClient, FraudScoreClient, ScoringError, Transaction
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.bootstrap import key_store, registry
from scoring_service.cli import app
from scoring_service.config import Settings
from tests.servers.certs import TestCA
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e


def card() -> str:
    return f"client-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def client(scorer):  # type: ignore[no-untyped-def]
    # A generous deadline and retries: on a loaded CI machine the service's admission control may push back
    # (RESOURCE_EXHAUSTED + grpc-retry-pushback-ms), which the client then absorbs, as documented.
    with FraudScoreClient(scorer.address, timeout_s=5.0, retries=8) as c:
        yield c


def test_score_answers_a_new_card_with_the_model(client: FraudScoreClient, active_model) -> None:  # type: ignore[no-untyped-def]
    result = client.score(card(), "17", 99.5, transaction_id="tx-client-1", currency="EUR",
                          timestamp=datetime.now(UTC))
    assert result.transaction_id == "tx-client-1"
    assert result.source == "MODEL" and result.decision in {"APPROVE", "REVIEW", "DECLINE"}
    assert 0.0 <= result.risk_score <= 1.0 and result.model_version == active_model.version
    assert result.scored_at is not None and result.request_id


def test_score_batch_answers_in_order(client: FraudScoreClient) -> None:
    txs = [Transaction(card(), "17", float(10 * i), transaction_id=f"b-{i}-{uuid.uuid4().hex[:6]}") for i in range(5)]
    results = client.score_batch(txs)
    assert [r.transaction_id for r in results] == [t.transaction_id for t in txs]
    assert all(r.decision in {"APPROVE", "REVIEW", "DECLINE"} for r in results)


def test_health_is_serving(client: FraudScoreClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("fraudscore.v1.FraudScoring") == "SERVING"


@pytest.mark.parametrize(("amount", "words"), [(-3.0, "transaction.amount"), (float("nan"), "must be finite")])
def test_bad_input_is_a_scoring_error_naming_the_field(client: FraudScoreClient, amount: float, words: str) -> None:
    with pytest.raises(ScoringError) as exc:
        client.score(card(), "17", amount)
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details


def test_an_empty_customer_is_refused(client: FraudScoreClient) -> None:
    with pytest.raises(ScoringError) as exc:
        client.score("", "17", 5.0)
    assert exc.value.code_name == "INVALID_ARGUMENT" and "customer_id" in exc.value.details


def test_the_async_client_scores_concurrently(scorer) -> None:  # type: ignore[no-untyped-def]
    async def run() -> list[str]:
        async with AsyncFraudScoreClient(scorer.address, timeout_s=5.0, retries=8) as c:
            assert await c.health() == "SERVING"
            results = await asyncio.gather(*(c.score(card(), "17", 20.0 + i) for i in range(4)))
            return [r.decision for r in results]

    assert len(asyncio.run(run())) == 4


def _cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """The command line, in process (a subprocess costs seconds of imports per call on a small machine)."""
    return CliRunner().invoke(app, list(args), env={"FRAUDSCORE_API_KEY": None, **(env or {})})


def test_cli_health_and_an_api_key_from_the_environment_never_echoed(scorer) -> None:  # type: ignore[no-untyped-def]
    out = _cli("health", "--address", scorer.address, env={"FRAUDSCORE_API_KEY": "k-never-shown"})
    assert out.exit_code == 0 and "SERVING" in out.stdout
    helped = _cli("score", "--help", env={"FRAUDSCORE_API_KEY": "k-never-shown"})
    assert helped.exit_code == 0 and "FRAUDSCORE_API_KEY" in helped.stdout and "k-never-shown" not in helped.stdout


def test_cli_tls_flags_fail_clearly(scorer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = _cli("score", "--customer", "1", "--terminal", "2", "--amount", "1", "--address", scorer.address,
                   "--tls-ca", str(tmp_path / "nope.pem"))
    assert missing.exit_code == 2 and "tls_ca: cannot read" in missing.stderr
    half = _cli("health", "--address", scorer.address, "--tls-cert", str(tmp_path / "c.pem"))
    assert half.exit_code == 2 and "tls_cert and tls_key" in half.stderr


# ---- TLS, mutual TLS and the API key, against a server that requires them (docs/security.md)
PEPPER = "client-test-pepper-0123456789"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, active_model: ModelRecord,
           redis_url: str) -> Iterator[tuple[ScorerProcess, TestCA, str]]:
    """(server, CA, API key): mutual TLS and FRAUDSCORE_AUTH=required, on a registry of its own."""
    data_dir = tmp_path_factory.mktemp("fs-client-tls")
    registry(Settings(data_dir=data_dir)).register(
        version=active_model.version, framework=active_model.framework, artifact_path=active_model.artifact_path,
        sha256=active_model.sha256, feature_names=active_model.feature_names, thresholds=active_model.thresholds,
        policy=active_model.policy, activate=True)
    _, key = key_store(Settings(data_dir=data_dir, key_pepper=PEPPER)).create("client-e2e", ["score"])
    assert key
    ca = TestCA(data_dir / "pki")
    cert, cert_key, _ = ca.issue("server", "localhost", server=True)
    client_pair = ca.issue("client", "client-e2e")[:2]
    env = {"FRAUDSCORE_AUTH": "required", "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_TLS_CERT": str(cert),
           "FRAUDSCORE_TLS_KEY": str(cert_key), "FRAUDSCORE_TLS_CLIENT_CA": str(ca.ca_path),
           "FRAUDSCORE_REGISTRY_POLL_S": "0.5", "FRAUDSCORE_REDIS_TIMEOUT_MS": "200", "FRAUDSCORE_DRAIN_S": "0"}
    proc = ScorerProcess(data_dir, redis_url, env=env, tls_ca=ca.ca_path, client_cert=client_pair).start()
    yield proc, ca, key
    proc.stop()


def _tls(ca: TestCA) -> dict[str, Path]:
    return {"tls_ca": ca.ca_path, "tls_cert": ca.folder / "client.pem", "tls_key": ca.folder / "client.key"}


def test_mutual_tls_and_the_api_key_score(secure) -> None:  # type: ignore[no-untyped-def]
    proc, ca, key = secure
    with FraudScoreClient(proc.address, timeout_s=5.0, api_key=key, retries=8, **_tls(ca)) as c:
        assert c.health() == "SERVING"
        assert c.score(card(), "17", 42.0).decision in {"APPROVE", "REVIEW", "DECLINE"}


@pytest.mark.parametrize("api_key", [None, "not-a-key"])
def test_no_or_a_wrong_key_is_unauthenticated(secure, api_key: str | None) -> None:  # type: ignore[no-untyped-def]
    proc, ca, _ = secure
    with FraudScoreClient(proc.address, timeout_s=5.0, api_key=api_key, retries=8, **_tls(ca)) as c, \
            pytest.raises(ScoringError) as exc:
        c.score(card(), "17", 42.0)
    assert exc.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_without_the_client_certificate_no_connection_is_made(secure) -> None:  # type: ignore[no-untyped-def]
    proc, ca, key = secure
    with FraudScoreClient(proc.address, timeout_s=2.0, api_key=key, tls_ca=ca.ca_path) as c, \
            pytest.raises(ScoringError) as exc:
        c.score(card(), "17", 42.0)
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE


def test_cli_over_mutual_tls_with_the_key_from_the_environment(secure) -> None:  # type: ignore[no-untyped-def]
    proc, ca, key = secure
    tls = _tls(ca)
    out = _cli("score", "--customer", card(), "--terminal", "17", "--amount", "12.5", "--address", proc.address, "--json",
               "--tls-ca", str(tls["tls_ca"]), "--tls-cert", str(tls["tls_cert"]), "--tls-key", str(tls["tls_key"]),
               env={"FRAUDSCORE_API_KEY": key})
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["decision"] in {"APPROVE", "REVIEW", "DECLINE"}
    assert key not in out.stdout + out.stderr
    refused = _cli("score", "--customer", card(), "--terminal", "17", "--amount", "12.5", "--address", proc.address,
                   "--tls-ca", str(tls["tls_ca"]), "--tls-cert", str(tls["tls_cert"]), "--tls-key", str(tls["tls_key"]),
                   env={"FRAUDSCORE_API_KEY": ""})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr
