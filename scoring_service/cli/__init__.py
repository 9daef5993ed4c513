"""``fraudscore``: one command line for the service, the model registry and the batch jobs."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scoring_service.config import ScoringMode, Settings, load_settings
from scoring_service.logging import configure_logging, get_logger

app = typer.Typer(
    name="fraudscore",
    help="Real-time fraud scoring: a gRPC Score() service over a Redis cache of entity risk, "
    "GBDT models for unseen entities, and Kafka-fed batch jobs that refresh the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The model registry: list, activate, shadow, retire model versions.", no_args_is_help=True)
db_app = typer.Typer(help="The SQL database (model registry, batch runs, audit).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings(**overrides: Any) -> Settings:
    try:
        settings = load_settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: say which setting is wrong
        raise _fail(f"invalid configuration: {exc}") from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _registry(settings: Settings):  # type: ignore[no-untyped-def]
    from scoring_service.training.lifecycle import open_registry

    return open_registry(settings)


# --------------------------------------------------------------------------------------------- serve


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: each process serves its own metrics on ``metrics_port + index``."""
    if settings.metrics_port is None:
        return settings
    return settings.model_copy(update={"metrics_port": settings.metrics_port + index})


def _worker_main(settings_json: str, redis_url: str | None) -> None:
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_format, settings.log_level)
    from scoring_service.online.server import serve_forever

    run_event_loop(serve_forever(settings, redis_url), settings.event_loop)


def join_workers(procs: list) -> list[int | None]:  # type: ignore[type-arg]
    """Wait for started worker processes, passing SIGTERM/SIGINT on to them; their exit codes."""

    def _forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def run_event_loop(coro, kind: str = "uvloop"):  # type: ignore[no-untyped-def]
    """Run ``coro`` to completion on a new event loop: uvloop, or the standard one."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@app.command()
def serve(
    listen: Annotated[str | None, typer.Option(help="Address to listen on [env FRAUDSCORE_LISTEN, default 127.0.0.1:50051].")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes sharing the port [FRAUDSCORE_WORKERS, 1].")] = None,
    mode: Annotated[ScoringMode | None, typer.Option(help="cache-first or always-model [FRAUDSCORE_MODE].")] = None,
    device: Annotated[str | None, typer.Option(help="Model device: auto, cpu, cuda [FRAUDSCORE_DEVICE].")] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Latency budget per request in ms [FRAUDSCORE_BUDGET_MS, 100].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder for SQLite, models, embedded Redis [FRAUDSCORE_DATA_DIR, ./var].")] = None,
) -> None:
    """Run the gRPC scoring service (embedded defaults: SQLite, in-process valkey, a demo model)."""
    settings = _settings(listen=listen, workers=workers, mode=mode, device=device, budget_ms=budget_ms, data_dir=data_dir)
    log = get_logger("fraudscore.serve")
    from scoring_service.adapters.model.gbdt import choose_device

    log.info("model.device", requested=settings.device, chosen=choose_device(settings.device))
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        from scoring_service.adapters.redis.embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings)
        redis_url = embedded.start()
        log.info("redis.embedded_started", url=redis_url, note="set REDIS_URL to use your own Redis")
    try:
        from scoring_service.training.lifecycle import ensure_model

        ensure_model(settings)
        if settings.workers == 1:
            from scoring_service.online.server import serve_forever

            run_event_loop(serve_forever(settings, redis_url), settings.event_loop)
            return
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_main, args=(_worker_settings(settings, i).model_dump_json(), redis_url),
                        name=f"scorer-{i}")
            for i in range(settings.workers)
        ]
        for p in procs:
            p.start()
        log.info("server.workers", count=len(procs), pids=[p.pid for p in procs])
        codes = join_workers(procs)
        if any(codes):
            raise _fail(f"worker exit codes {codes}", 1)
    finally:
        if embedded is not None:
            embedded.stop()


# --------------------------------------------------------------------------------------------- train


@app.command()
def train(
    data: Annotated[Path | None, typer.Option(help="Handbook-format Parquet file of payments.")] = None,
    framework: Annotated[str, typer.Option(help="xgboost or lightgbm.")] = "xgboost",
    activate: Annotated[bool, typer.Option(help="Activate the new version once registered.")] = True,
    simulated: Annotated[bool, typer.Option(help="Train on simulated payments instead of --data.")] = False,
) -> None:
    """Train on the handbook protocol, print the test-week metrics, register the model."""
    settings = _settings()
    if framework not in ("xgboost", "lightgbm"):
        raise _fail(f"--framework must be xgboost or lightgbm, got {framework!r}")
    if data is None and not simulated:
        raise _fail("give --data PARQUET (the handbook file) or --simulated")
    if data is not None and not data.is_file():
        raise _fail(f"no such file: {data}")
    registry = _registry(settings)
    from scoring_service.training.lifecycle import DEMO_SIMULATION, train_and_register

    payments = None
    if simulated:
        from scoring_service.training.simulator import simulate

        payments = simulate(**DEMO_SIMULATION)
    started = time.monotonic()
    record, result = train_and_register(
        settings, registry, framework=framework, activate=activate, data=data, payments=payments,
        description=f"trained on {data or 'simulated payments'}",
    )
    table = Table(title=f"model {record.version} ({record.framework}, status {record.status})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    table.add_row("thresholds", json.dumps(result.thresholds))
    table.add_row("train seconds", f"{time.monotonic() - started:.1f}")
    console.print(table)
    print(json.dumps({"version": record.version, "metrics": result.metrics, "thresholds": result.thresholds}))


# --------------------------------------------------------------------------------------------- model


@model_app.command("list")
def model_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List registered model versions."""
    records = _registry(_settings()).list()
    if as_json:
        print(json.dumps([
            {"version": r.version, "framework": r.framework, "status": r.status, "metrics": r.metrics,
             "thresholds": r.thresholds, "sha256": r.sha256, "artifact_path": r.artifact_path}
            for r in records
        ], indent=2))
        return
    table = Table(title="model versions")
    for col in ("version", "framework", "status", "AUC", "AP", "CP@100", "created"):
        table.add_column(col)
    for r in records:
        m = r.metrics
        table.add_row(r.version, r.framework, r.status, *(f"{m[k]:.3f}" if k in m else "-" for k in
                      ("auc_roc", "average_precision", "card_precision_at_100")), f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def _registry_call(fn_name: str, version: str) -> None:
    from scoring_service.adapters.model.gbdt import GbdtModel, ModelError
    from scoring_service.adapters.sql.registry import RegistryError

    settings = _settings()
    registry = _registry(settings)
    try:
        if fn_name == "activate":
            record = registry.get(version)
            try:  # refuse to activate what the service would refuse to load
                GbdtModel.load(record.artifact_path, record.framework, record.feature_names,
                               expected_sha256=record.sha256, device="cpu")
            except ModelError as exc:
                raise _fail(f"not activated: {exc}") from None
            record = registry.activate(version)
        else:
            record = registry.set_status(version, fn_name)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{record.version}: {record.status}")


@model_app.command("activate")
def model_activate(version: str) -> None:
    """Make VERSION the active model (running services pick it up within seconds)."""
    _registry_call("activate", version)


@model_app.command("shadow")
def model_shadow(version: str) -> None:
    """Mark VERSION as shadow (registered, not serving)."""
    _registry_call("shadow", version)


@model_app.command("retire")
def model_retire(version: str) -> None:
    """Retire VERSION."""
    _registry_call("retired", version)


# --------------------------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations (creates the schema on a new database)."""
    settings = _settings()
    from scoring_service.adapters.sql.db import upgrade_schema

    upgrade_schema(settings.resolved_database_url())
    console.print("database at the newest migration")


# --------------------------------------------------------------------------------------------- client


@app.command()
def score(
    customer: Annotated[str, typer.Option(help="Customer (card) id.")],
    terminal: Annotated[str, typer.Option(help="Terminal id.")],
    amount: Annotated[float, typer.Option(help="Amount (>= 0).")],
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
        transaction=scoring_pb2.Transaction(
            transaction_id=transaction_id or uuid.uuid4().hex, customer_id=customer, terminal_id=terminal,
            amount=amount, currency=currency,
        ),
    )
    request.transaction.timestamp.GetCurrentTime()
    with grpc.insecure_channel(address) as channel:
        try:
            resp = scoring_pb2_grpc.FraudScoringStub(channel).Score(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _fail(f"{exc.code().name}: {exc.details()}", 1) from None
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


@app.command()
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
            raise _fail(f"{exc.code().name}: {exc.details()}", 1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    console.print(status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


try:  # the batch jobs add `nightly`, `replay` and `events`
    from scoring_service.cli.batch import register as _register_batch
except ImportError as _exc:  # pragma: no cover - only while batch_jobs is incomplete
    if "scoring_service.cli.batch" not in str(_exc):
        raise
else:
    _register_batch(app)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
