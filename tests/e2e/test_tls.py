"""TLS and mutual TLS on the real server (issue 14): a CA of the test's own (``cryptography``).

One `fraudscore serve` with FRAUDSCORE_TLS_CERT/KEY and FRAUDSCORE_TLS_CLIENT_CA (mutual TLS) and
FRAUDSCORE_AUTH=required: a plaintext client and a TLS client without a certificate fail the
handshake; a client certificate whose CN is registered (`keys create --mtls`) is an identity that
scores without a key; a new server certificate written on disk is served to new connections
without a restart.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from scoring_service.adapters.sql.keys import KeyStore
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.bootstrap import key_store, registry
from scoring_service.config import Settings
from scoring_service.protos import scoring_pb2
from tests.servers.certs import TestCA
from tests.servers.scorer import ScorerProcess

PEPPER = "tls-test-pepper-0123456789abcdef"


def _score(n: int = 1) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
        transaction_id=f"tls-tx-{n}", customer_id=f"tls-c-{n}", terminal_id="17", amount=20.0))


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory, active_model: ModelRecord) -> Path:
    data_dir = tmp_path_factory.mktemp("fs-tls")
    registry(Settings(data_dir=data_dir)).register(
        version=active_model.version, framework=active_model.framework, artifact_path=active_model.artifact_path,
        sha256=active_model.sha256, feature_names=active_model.feature_names, thresholds=active_model.thresholds,
        policy=active_model.policy, activate=True)
    return data_dir


@pytest.fixture(scope="module")
def ca(tls_dir: Path) -> TestCA:
    return TestCA(tls_dir / "pki")


@pytest.fixture(scope="module")
def keys(tls_dir: Path) -> KeyStore:
    return key_store(Settings(data_dir=tls_dir, key_pepper=PEPPER))


@pytest.fixture(scope="module")
def client_cert(ca: TestCA, keys: KeyStore) -> tuple[Path, Path]:
    keys.create("checkout-service", ["score"], mtls=True)  # the CN is an identity with the scope score
    cert, key, _ = ca.issue("client", "checkout-service")
    return cert, key


@pytest.fixture(scope="module")
def server(tls_dir: Path, redis_url: str, ca: TestCA, client_cert: tuple[Path, Path]) -> Iterator[ScorerProcess]:
    cert, key, serial = ca.issue("server", "localhost", server=True)
    env = {"FRAUDSCORE_AUTH": "required", "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_TLS_CERT": str(cert),
           "FRAUDSCORE_TLS_KEY": str(key), "FRAUDSCORE_TLS_CLIENT_CA": str(ca.ca_path), "FRAUDSCORE_DRAIN_S": "0",
           "FRAUDSCORE_MAX_QUEUE_MS": "0"}
    proc = ScorerProcess(tls_dir, redis_url, env=env, tls_ca=ca.ca_path, client_cert=client_cert).start(timeout=300)
    proc.first_serial = serial  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def served_serial(server: ScorerProcess, ca: TestCA, client_cert: tuple[Path, Path]) -> int:
    """The serial number of the certificate the server presents to a new connection (HTTP/2 over TLS)."""
    ctx = ssl.create_default_context(cafile=str(ca.ca_path))
    ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def code_of(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        scoring_pb2_grpc_stub(channel).Score(_score(), metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def scoring_pb2_grpc_stub(channel: grpc.Channel) -> object:
    from scoring_service.protos import scoring_pb2_grpc

    return scoring_pb2_grpc.FraudScoringStub(channel)


def test_a_registered_client_certificate_scores_without_a_key(server: ScorerProcess) -> None:
    with server.channel() as ch:  # the CA and the client certificate of CN checkout-service
        assert code_of(ch) == grpc.StatusCode.OK


def test_plaintext_and_tls_without_a_client_certificate_fail(server: ScorerProcess, ca: TestCA) -> None:
    with grpc.insecure_channel(server.address) as ch:
        assert code_of(ch) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(ca.ca_path.read_bytes())) as ch:
        assert code_of(ch) == grpc.StatusCode.UNAVAILABLE


def test_an_unregistered_or_revoked_certificate_identity_is_unauthenticated(
    server: ScorerProcess, ca: TestCA, keys: KeyStore
) -> None:
    stranger = ca.issue("stranger", "unknown-service")[:2]
    creds = grpc.ssl_channel_credentials(ca.ca_path.read_bytes(), stranger[1].read_bytes(), stranger[0].read_bytes())
    with grpc.secure_channel(server.address, creds) as ch:
        assert code_of(ch) == grpc.StatusCode.UNAUTHENTICATED
        # a key still works over the same mTLS connection: the key is the identity then
        _, key = keys.create("stranger-with-key", ["score"])
        assert code_of(ch, (("x-api-key", key),)) == grpc.StatusCode.OK


def test_a_rotated_server_certificate_is_served_without_a_restart(
    server: ScorerProcess, ca: TestCA, client_cert: tuple[Path, Path]
) -> None:
    assert served_serial(server, ca, client_cert) == server.first_serial  # type: ignore[attr-defined]
    pid = server.proc.pid  # type: ignore[union-attr]
    _, _, new_serial = ca.issue("server", "localhost", server=True)  # same paths, new key and certificate
    deadline = time.monotonic() + 30
    seen = served_serial(server, ca, client_cert)
    while seen != new_serial and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = served_serial(server, ca, client_cert)
    assert seen == new_serial
    assert server.proc.pid == pid and server.proc.poll() is None  # type: ignore[union-attr]
    with server.channel(**{"grpc.use_local_subchannel_pool": 1}) as ch:  # a new connection, the new certificate
        assert code_of(ch) == grpc.StatusCode.OK
    assert server.log_events("tls.reloaded")
