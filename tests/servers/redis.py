"""A real redis-server (Debian's package) on a free loopback port, no persistence.

Options for the security tests: ``extra_args`` (``--requirepass``, ``--user ...`` ACL rules) and
``tls`` (:func:`make_tls_files`: a CA of the test's own, a server and a client certificate): the
server then listens with TLS only, and ``url`` is a ``rediss://`` URL that trusts the CA.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from scoring_service.core.cache_layout import CacheEntry, seal
from scoring_service.core.integrity import MacKeys
from tests.servers.common import free_port, require_binary, stop_process, wait_for_port

# The cache MAC keys of the test session (tests/conftest.py puts them in FRAUDSCORE_CACHE_MAC_KEYS, so the
# scorers it starts and the batch runs in-process share them); tests that forge entries use their own.
TEST_CACHE_MAC_KEYS = "test:fraudscore-test-session-mac-key"


def sealed_item(key: str, entry: CacheEntry) -> tuple[str, bytes]:
    """(key, value) as a batch run of this test session writes ``entry`` under ``key`` (sealed)."""
    return key, seal(MacKeys.parse(TEST_CACHE_MAC_KEYS), key, entry.encode())


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA, the server's certificate and key, a client certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A test CA and the certificates it signs (the server's for 127.0.0.1 and localhost), made with cryptography."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
             *, ca: bool = False, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("fraudscore test CA", ca_key, None, ca_key, ca=True)
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role, san in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"fraudscore-{role}", key, ca_cert.subject, ca_key, san=san)
        out[f"{role}_cert"] = folder / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, folder / f"{role}.key")
    return TlsFiles(**out)


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()  # e.g. ("--requirepass", "s3cret") or ("--user", "alice", "on", ">pw", "~*", "+@all")
    tls: TlsFiles | None = None  # TLS only on ``port``; clients must present a certificate the CA signed
    proc: subprocess.Popen | None = None
    _dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, user: str | None, password: str) -> str:
        """``url`` with credentials (``user`` None: the default user of ``--requirepass``)."""
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{quote(user or '', safe='')}:{quote(password, safe='')}@{rest}"

    def start(self) -> RedisServer:
        binary = require_binary("redis-server", "run `make deps` (apt-get install -y redis-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="fs-redis-")
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "yes"]
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", *ports, "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._dir is not None:
            self._dir.cleanup()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)
