"""The admin RPC's client for ``fraudscore model activate|shadow|retire|rollback --server HOST:PORT``.

Registry changes go through a running server (``fraudscore.v1.ModelAdmin``), which checks the
caller's key (scope ``admin``) or mTLS identity and records it in the audit log. ``--direct``
writes the database instead: a break-glass for when no server runs, audited as ``local:<uid>``
and warned about (docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from scoring_service.cli.common import err, fail
from scoring_service.online.tls import open_channel
from scoring_service.protos import admin_pb2, admin_pb2_grpc

ServerOpt = Annotated[str | None, typer.Option("--server", help="A running server HOST:PORT: the change goes through "
                                               "its admin RPC (scope admin), audited with your key's owner.")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="FRAUDSCORE_API_KEY", show_default=False,
                                               help="API key with the scope admin [FRAUDSCORE_API_KEY].")]
TlsOpt = Annotated[bool, typer.Option("--tls", help="TLS with the system's CA roots (implied by --tls-ca/--tls-cert).")]
TlsCaOpt = Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate (PEM) that signed the server's.")]
TlsCertOpt = Annotated[Path | None, typer.Option("--tls-cert", help="Client certificate (PEM), for mutual TLS.")]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="Client private key (PEM), for mutual TLS.")]
DirectOpt = Annotated[bool, typer.Option("--direct", help="Break-glass: write the database directly (no server), "
                                         "audited as local:<uid>.")]


@dataclass(frozen=True, slots=True)
class Remote:
    server: str | None
    api_key: str | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    direct: bool = False

    def check(self) -> None:
        """Exactly one of --server and --direct (exit 2 otherwise); a warning for --direct."""
        if self.server and self.direct:
            fail("give --server or --direct, not both")
        if not self.server and not self.direct:
            fail("give --server HOST:PORT (the admin RPC, audited with your API key's owner) or --direct "
                 "(break-glass: writes the database directly, audited as local:<uid>)")
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not path.is_file():
                fail(f"{flag}: no such file: {path}")
        if self.direct:
            err.print("[yellow]warning:[/] --direct bypasses the service's authentication: the change is written to "
                      "the database and audited as local:<uid>")

    def call(self, method: str, request: Any, timeout_s: float = 30.0) -> Any:
        """``ModelAdmin/<method>`` on the server; a refused call exits 1 with the server's message."""
        assert self.server is not None
        metadata = (("x-api-key", self.api_key),) if self.api_key else ()
        try:
            with open_channel(self.server, tls=self.tls, ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key) as ch:
                stub = admin_pb2_grpc.ModelAdminStub(ch)
                return getattr(stub, method)(request, metadata=metadata, timeout=timeout_s)
        except ValueError as exc:
            fail(str(exc))
        except grpc.RpcError as exc:
            fail(f"{self.server}: {exc.code().name}: {exc.details()}", 1)

    def set_status(self, version: str, status: str) -> Any:
        return self.call("SetModelStatus", admin_pb2.SetModelStatusRequest(version=version, status=status))

    def rollback(self) -> Any:
        return self.call("Rollback", admin_pb2.RollbackRequest())
