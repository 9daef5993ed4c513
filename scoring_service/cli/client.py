"""``fraudscore score`` and ``fraudscore health``: call a running service (for people and probes)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from scoring_service.cli.common import console, fail


def score(
    customer: Annotated[str, typer.Option(help="Customer (card) id.")],
    terminal: Annotated[str, typer.Option(help="Terminal id.")],
    amount: Annotated[float, typer.Option(help="Amount, 0 to 10,000,000 in the currency's units (0: a card verification).")],
    address: Annotated[str, typer.Option(help="Service address.")] = "127.0.0.1:50051",
    transaction_id: Annotated[str | None, typer.Option(help="Transaction id (default: generated).")] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 currency; empty = the service's default.")] = "",
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Call a running service's Score() and print the answer."""
    import uuid

    import grpc
    from google.protobuf.json_format import MessageToDict

    from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

    request = scoring_pb2.ScoreRequest(
        request_id=uuid.uuid4().hex,
        transaction=scoring_pb2.Transaction(  # setting the amount marks it present, 0 included
            transaction_id=transaction_id or uuid.uuid4().hex, customer_id=customer, terminal_id=terminal,
            amount=amount, currency=currency,
        ),
    )
    request.transaction.timestamp.GetCurrentTime()
    with grpc.insecure_channel(address) as channel:
        try:
            resp = scoring_pb2_grpc.FraudScoringStub(channel).Score(request, timeout=timeout)
        except grpc.RpcError as exc:
            fail(f"{exc.code().name}: {exc.details()}", 1)
    data = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
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
    address: Annotated[str, typer.Option(help="Service address.")] = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 2.0,
) -> None:
    """Exit 0 when the service reports SERVING through grpc.health.v1 (for probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            fail(f"{exc.code().name}: {exc.details()}", 1)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    console.print(status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(score)
    app.command()(health)
