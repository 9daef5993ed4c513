"""Channel credentials and call metadata: TLS (server-verified, or mutual) and the API key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEY_HEADER = "x-api-key"
# This attempt's timeout, sent with it: the service measures from it how long the call waited before
# its handler, and refuses (RESOURCE_EXHAUSTED) a call that waited past its queueing bound
# (scoring_service/online/admission.py reads it; the same name there).
TIMEOUT_HEADER = "x-fraudscore-timeout-ms"
PathLike = str | Path


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to connect. Any ``tls_*`` set: a TLS channel; none: plaintext (local use only)."""

    target: str
    tls_ca: PathLike | None = None
    tls_cert: PathLike | None = None
    tls_key: PathLike | None = None
    tls_server_name: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (a client certificate and its key) or neither")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must not be empty")

    @property
    def secure(self) -> bool:
        return any(x is not None for x in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials: the CA to verify the server (None: the system's roots), the client pair for mTLS."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca"),
            private_key=_read(self.tls_key, "tls_key"),
            certificate_chain=_read(self.tls_cert, "tls_cert"),
        )

    def options(self) -> list[tuple[str, str | int]]:
        opts: list[tuple[str, str | int]] = []
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((API_KEY_HEADER, self.api_key),) if self.api_key else ()

    def attempt_metadata(self, timeout_s: float) -> tuple[tuple[str, str], ...]:
        """The metadata of one attempt whose gRPC timeout is ``timeout_s``."""
        return (*self.metadata(), (TIMEOUT_HEADER, f"{timeout_s * 1000:.1f}"))

    def __repr__(self) -> str:  # never print the key
        key = "<set>" if self.api_key else None
        return f"ChannelConfig(target={self.target!r}, secure={self.secure}, api_key={key})"


def _read(path: PathLike | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc


def open_channel(config: ChannelConfig) -> grpc.Channel:
    if config.secure:
        return grpc.secure_channel(config.target, config.credentials(), options=config.options())
    return grpc.insecure_channel(config.target, options=config.options())


def open_aio_channel(config: ChannelConfig) -> grpc.aio.Channel:
    if config.secure:
        return grpc.aio.secure_channel(config.target, config.credentials(), options=config.options())
    return grpc.aio.insecure_channel(config.target, options=config.options())
