"""TLS for the gRPC server (and its clients): certificates by path, reloaded on change.

``server_credentials`` builds grpc's dynamic SSL credentials: grpc-core asks the fetcher for a new
configuration at each new connection's handshake; the fetcher compares the files' mtimes and
sizes (three ``stat`` calls) and reads them again only when one changed, after checking that the
new key matches the new certificate (a rotation caught between the two writes keeps the old pair
and is tried again at the next handshake). Open connections keep the certificate they shook hands
with; new ones get the new one, with no restart.

With ``client_ca``: mutual TLS, every client must present a certificate that CA signed; its
subject CN and SANs are the caller's identity (``peer_names``), which ``online/auth.py`` maps to
scopes through the ``api_keys`` rows of kind ``mtls``.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

import grpc

from scoring_service.logging import get_logger

log = get_logger(__name__)


def _signature(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


def _pair_matches(cert: bytes, key: bytes) -> bool:
    """True when ``key`` is the private key of ``cert`` (the stdlib loads the pair and checks it)."""
    with tempfile.TemporaryDirectory() as tmp:
        cp, kp = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        cp.write_bytes(cert)
        kp.write_bytes(key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cp, kp)
        except (ssl.SSLError, ValueError):
            return False
    return True


class ReloadingCertificates:
    """The fetcher of ``grpc.dynamic_ssl_server_credentials``: a new configuration when the files changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.paths = [p for p in (cert, key, client_ca) if p is not None]
        self._seen: tuple[tuple[int, int], ...] | None = None
        self.reloads = 0

    def load(self) -> grpc.ServerCertificateConfiguration | None:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        if not _pair_matches(cert, key):
            return None
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        sig = _signature(self.paths)
        config = self.load()
        if config is None:
            raise ValueError(f"TLS: the key {self.key} is not the private key of the certificate {self.cert}")
        self._seen = sig
        return config

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            sig = _signature(self.paths)
            if sig == self._seen:
                return None
            config = self.load()
        except OSError as exc:  # a file being replaced: keep the old configuration, try again next handshake
            log.warning("tls.reload_failed", error=str(exc))
            return None
        if config is None:
            return None
        self._seen = sig
        self.reloads += 1
        log.info("tls.reloaded", cert=str(self.cert), reloads=self.reloads)
        return config


def check_paths(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """ValueError naming the setting when TLS is half-configured or a file is missing."""
    if (cert is None) != (key is None):
        raise ValueError("FRAUDSCORE_TLS_CERT and FRAUDSCORE_TLS_KEY go together")
    if client_ca is not None and cert is None:
        raise ValueError("FRAUDSCORE_TLS_CLIENT_CA (mutual TLS) needs FRAUDSCORE_TLS_CERT and FRAUDSCORE_TLS_KEY")
    for name, path in (("CERT", cert), ("KEY", key), ("CLIENT_CA", client_ca)):
        if path is not None and not path.is_file():
            raise ValueError(f"FRAUDSCORE_TLS_{name}: no such file: {path}")


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS (mutual TLS with ``client_ca``) server credentials that follow the files on disk."""
    fetcher = ReloadingCertificates(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(fetcher.initial(), fetcher,
                                               require_client_authentication=client_ca is not None)


def peer_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's subject CN and SANs ([] without a client certificate)."""
    auth = context.auth_context()
    names: list[str] = []
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(prop, ()):
            name = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return names


def channel_credentials(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``ca`` (None: the system's roots), present ``cert``/``key`` for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def open_channel(address: str, *, tls: bool = False, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> grpc.Channel:
    """A blocking channel to ``address``: TLS when ``tls`` or any of ``ca``/``cert``/``key`` is given, else plaintext."""
    if tls or ca or cert or key:
        return grpc.secure_channel(address, channel_credentials(ca, cert, key))
    return grpc.insecure_channel(address)
