"""``fraudscore score`` and ``fraudscore health``: call a running service (for people and probes).

Both go through the client package ``fraudscore_client`` (the same safe retries and TLS as any
Python caller's). The API key comes from ``--api-key`` or ``FRAUDSCORE_API_KEY`` and is never printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from scoring_service.cli.common import console, fail

if TYPE_CHECKING:
    from fraudscore_client import FraudScoreClient

Address = Annotated[str, typer.Option(help="Service address (host:port).")]
TlsCa = Annotated[Path | None, typer.Option(help="PEM file of the CA that signed the server's certificate (turns TLS on).")]
TlsCert = Annotated[Path | None, typer.Option(help="PEM client certificate, for mutual TLS (with --tls-key).")]
TlsKey = Annotated[Path | None, typer.Option(help="PEM private key of the client certificate.")]
TlsServerName = Annotated[str | None, typer.Option(help="Name to verify in the server's certificate (default: the host).")]
ApiKey = Annotated[str | None, typer.Option(envvar="FRAUDSCORE_API_KEY", show_default=False, show_envvar=True,
                                           help="API key, sent as x-api-key metadata (prefer the environment variable).")]
Retries = Annotated[int, typer.Option(min=0, help="Retries where safe (UNAVAILABLE, RESOURCE_EXHAUSTED with pushback).")]


@contextmanager
def _client(address: str, timeout: float, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
            tls_server_name: str | None, api_key: str | None, retries: int) -> Iterator[FraudScoreClient]:
    from fraudscore_client import FraudScoreClient, ScoringError  # noqa: F811 - at run time, on use

    try:
        client = FraudScoreClient(address, timeout_s=timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                  tls_server_name=tls_server_name, api_key=(api_key or "").strip() or None,  # empty: none
                                  retries=retries)
    except ValueError as exc:  # unreadable PEM file, a certificate without its key, a bad timeout
        fail(str(exc), 2)
    try:
        with client:
            yield client
    except ScoringError as exc:
        fail(f"{exc.code_name}: {exc.details}", 1)


def score(
    customer: Annotated[str, typer.Option(help="Customer (card) id.")],
    terminal: Annotated[str, typer.Option(help="Terminal id.")],
    amount: Annotated[float, typer.Option(help="Amount, 0 to 10,000,000 in the currency's units (0: a card verification).")],
    address: Address = "127.0.0.1:50051",
    transaction_id: Annotated[str | None, typer.Option(help="Transaction id (default: generated).")] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 currency; empty = the service's default.")] = "",
    timeout: Annotated[float, typer.Option(help="Deadline in seconds, retries included.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_server_name: TlsServerName = None,
    api_key: ApiKey = None,
    retries: Retries = 2,
) -> None:
    """Call a running service's Score() and print the answer."""
    from datetime import UTC, datetime

    from google.protobuf.json_format import MessageToDict
    from rich.table import Table

    with _client(address, timeout, tls_ca, tls_cert, tls_key, tls_server_name, api_key, retries) as client:
        result = client.score(customer, terminal, amount, transaction_id=transaction_id,
                              currency=currency, timestamp=datetime.now(UTC))
    data = MessageToDict(result.raw, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if as_json:
        print(json.dumps(data))
        return
    table = Table(title=f"score for customer {customer}", show_header=False)
    for k in ("risk_score", "decision", "source", "model_version", "degraded", "latency_ms", "scored_at", "transaction_id"):
        table.add_row(k, str(data.get(k)))
    for r in data.get("reasons", []):
        table.add_row("reason", f"{r['code']} ({r['feature']}: {r['contribution']:+.3f})")
    console.print(table)


def health(
    address: Address = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 2.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_server_name: TlsServerName = None,
    api_key: ApiKey = None,
) -> None:
    """Exit 0 when the service reports SERVING through grpc.health.v1 (for probes)."""
    with _client(address, timeout, tls_ca, tls_cert, tls_key, tls_server_name, api_key, 0) as client:
        status = client.health()
    console.print(status)
    if status != "SERVING":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(score)
    app.command()(health)
