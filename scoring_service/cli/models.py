"""``fraudscore train``, ``retrain``, ``fraudscore model ...`` and ``fraudscore db upgrade``: models and their registry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from scoring_service import bootstrap
from scoring_service.cli.admin_client import (
    ApiKeyOpt,
    DirectOpt,
    Remote,
    ServerOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsOpt,
)
from scoring_service.cli.common import cli_settings, console, fail

model_app = typer.Typer(help="The model registry: list, activate, shadow, retire model versions.", no_args_is_help=True)
db_app = typer.Typer(help="The SQL database (model registry, batch runs, audit).", no_args_is_help=True)


def train(
    data: Annotated[Path | None, typer.Option(help="Handbook-format Parquet file of payments.")] = None,
    framework: Annotated[str, typer.Option(help="xgboost or lightgbm.")] = "xgboost",
    activate: Annotated[bool, typer.Option(help="Activate the new version once registered.")] = True,
    simulated: Annotated[bool, typer.Option(help="Train on simulated payments instead of --data.")] = False,
) -> None:
    """Train on the handbook protocol, print the test-week metrics, register the model."""
    settings = cli_settings()
    if framework not in ("xgboost", "lightgbm"):
        fail(f"--framework must be xgboost or lightgbm, got {framework!r}")
    if data is None and not simulated:
        fail("give --data PARQUET (the handbook file) or --simulated")
    if data is not None and not data.is_file():
        fail(f"no such file: {data}")
    from scoring_service.training.demo import demo_payments
    from scoring_service.training.registration import train_and_register

    started = time.monotonic()
    record, result = train_and_register(
        bootstrap.registry(settings), settings.models_dir, framework=framework, activate=activate, data=data,
        payments=demo_payments() if simulated else None, description=f"trained on {data or 'simulated payments'}",
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


RETRAIN_REFUSED = 3  # exit code: the candidate is registered as shadow, the gate kept the active version


def retrain(
    as_of: Annotated[str | None, typer.Option("--as-of", help="The day D: labels that arrived by D are used "
                                                "(YYYY-MM-DD; default: today, UTC).")] = None,
    data: Annotated[Path | None, typer.Option(help="Parquet file of payments and labels (default: Kafka as the "
                                                   "nightly reads it, else FRAUDSCORE_EVENTS_FILE).")] = None,
    framework: Annotated[str, typer.Option(help="xgboost or lightgbm.")] = "xgboost",
    train_days: Annotated[int, typer.Option(help="Days of the training window.", min=1, max=90)] = 7,
    rounds: Annotated[int | None, typer.Option(help="Boosting rounds (default: as `train`, 300).", min=1)] = None,
    promote: Annotated[bool, typer.Option(help="Activate the candidate when the gate passes it.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
) -> None:
    """Train a candidate on the latest labelled window before D, compare it with the active version on the
    latest fully labelled week, register it as shadow, and promote it if the gate passes (docs/model.md).

    Exit 0: promoted (or registered with --no-promote); 3: refused by the gate, registered as shadow,
    the active version unchanged; 2: bad input, nothing registered."""
    settings = cli_settings()
    if framework not in ("xgboost", "lightgbm"):
        fail(f"--framework must be xgboost or lightgbm, got {framework!r}")
    if data is not None and not data.is_file():
        fail(f"no such file: {data}")
    from scoring_service.adapters.model.gbdt import ModelError
    from scoring_service.batch.pipeline import BatchError
    from scoring_service.batch.sources import EventSource
    from scoring_service.core.events import EventError
    from scoring_service.training import retrain as rt

    try:
        w = rt.windows(as_of or time.strftime("%Y-%m-%d", time.gmtime()), train_days)
    except ValueError:
        fail(f"--as-of: not a date: {as_of!r}")
    try:
        if data is not None:  # the file given wins over a configured Kafka
            from scoring_service.adapters.files.event_source import FileEventSource

            source: EventSource = FileEventSource(data)
        else:
            source = bootstrap.event_source(settings, job="retrain", group_id="fraudscore-retrain")
        source.check()
        events = source.read_window(w.read_start.timestamp(), w.eval_end.timestamp(), labels_until=w.as_of.timestamp())
    except (BatchError, EventError) as exc:
        fail(f"cannot read payments: {exc}")
    registry = bootstrap.registry(settings)
    active_record = registry.active()
    active, active_error = None, None
    if active_record is not None:
        try:
            active = (active_record, bootstrap.model_loader(settings, device="cpu")(active_record))
        except ModelError as exc:
            active_error = f"{active_record.version} does not load: {exc}"
    try:
        outcome = rt.retrain_and_register(registry, settings.models_dir, events.payments, w, framework=framework,
                                          active=active, active_error=active_error, rounds=rounds)
    except rt.RetrainError as exc:
        fail(f"{exc}; nothing registered, the active version unchanged")
    table = Table(title=f"retrain as of {w.as_of:%Y-%m-%d}: train {w.as_dict()['train']}, "
                        f"evaluation week {w.as_dict()['evaluation']}")
    table.add_column("")
    table.add_column(f"candidate {outcome.record.version}", justify="right")
    table.add_column(f"active {outcome.active_version or '-'}", justify="right")
    for key, label in (("auc_roc", "AUC"), ("average_precision", "AP"), ("card_precision_at_100", "CP@100")):
        table.add_row(label, *(f"{r['metrics'][key]:.4f}" if r else "-" for r in (outcome.candidate, outcome.active)))
    for key, label in (("genuine_decline_rate", "new cards: genuine declined"),
                       ("genuine_review_rate", "new cards: genuine reviewed")):
        table.add_row(label, *("-" if not r or r["new_cards"][key] is None else f"{r['new_cards'][key]:.2%}"
                               for r in (outcome.candidate, outcome.active)))
    console.print(table)
    promoted = outcome.gate.promote and promote
    if promoted:
        try:  # as `fraudscore model activate --direct`: the services switch, the nightly builds its cache generation
            bootstrap.model_loader(settings, device="cpu")(outcome.record)
            registry.activate(outcome.record.version)
        except ModelError as exc:
            fail(f"{outcome.record.version} registered as shadow, not activated: {exc}", 1)
    verdict = ("promoted: now the active version" if promoted else
               "registered as shadow (--no-promote)" if outcome.gate.promote else
               "refused by the gate: registered as shadow, the active version unchanged")
    print(f"gate: {outcome.record.version} {verdict}")
    for reason in outcome.gate.reasons:
        print(f"  {reason}")
    if as_json:
        print(json.dumps({"version": outcome.record.version, "promoted": promoted, "active_before": outcome.active_version,
                          "windows": w.as_dict(), "gate": outcome.gate.as_dict(), "candidate": outcome.candidate,
                          "active": outcome.active, "train_seconds": round(outcome.train_seconds, 1)}, default=float))
    if not outcome.gate.promote:
        raise typer.Exit(RETRAIN_REFUSED)


@model_app.command("list")
def model_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List registered model versions."""
    records = bootstrap.registry(cli_settings()).list()
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


def _set_status(status: str, version: str | None, remote: Remote) -> None:
    """Through the admin RPC (--server) or, break-glass, the database (--direct); version None: rollback."""
    from scoring_service.adapters.model.gbdt import ModelError
    from scoring_service.adapters.sql.registry import RegistryError

    remote.check()
    if remote.server:
        answer = remote.rollback() if version is None else remote.set_status(version, status)
        console.print(f"{answer.version}: {answer.status} (by {answer.actor}; "
                      f"previously active: {answer.previous_active or '-'})")
        return
    settings = cli_settings()
    registry = bootstrap.registry(settings)
    try:
        if version is None:
            version, status = registry.rollback_target(), "active"
        if status == "active":
            record = registry.get(version)
            try:  # refuse to activate what the service would refuse to load
                bootstrap.model_loader(settings, device="cpu")(record)
            except ModelError as exc:
                fail(f"not activated: {exc}")
            record = registry.activate(version)
        else:
            record = registry.set_status(version, status)
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"{record.version}: {record.status}")


@model_app.command("activate")
def model_activate(version: str, server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False,
                   tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
                   direct: DirectOpt = False) -> None:
    """Make VERSION the active model (running services pick it up within seconds)."""
    _set_status("active", version, Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct))


@model_app.command("shadow")
def model_shadow(version: str, server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False,
                 tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
                 direct: DirectOpt = False) -> None:
    """Mark VERSION as shadow (registered, not serving)."""
    _set_status("shadow", version, Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct))


@model_app.command("retire")
def model_retire(version: str, server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False,
                 tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
                 direct: DirectOpt = False) -> None:
    """Retire VERSION."""
    _set_status("retired", version, Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct))


@model_app.command("rollback")
def model_rollback(server: ServerOpt = None, api_key: ApiKeyOpt = None, tls: TlsOpt = False,
                   tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
                   direct: DirectOpt = False) -> None:
    """Activate the version that was active before the active one."""
    _set_status("active", None, Remote(server, api_key, tls, tls_ca, tls_cert, tls_key, direct))


def _serving_versions(server: str, timeout_s: float = 5.0) -> dict[str, object]:
    """What one running server says through its Prometheus endpoint (``host:port`` of FRAUDSCORE_METRICS_PORT):
    the version it serves, the registry's active one as it last read it, and its own mismatch gauge."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = server if "://" in server else f"http://{server}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read().decode("utf-8", errors="replace")
    except (OSError, ValueError) as exc:
        fail(f"--metrics {server}: no metrics at {url}: {exc}", 1)
    out: dict[str, object] = {"server": server, "serving": None, "active_seen": None, "mismatch_gauge": None}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "fraudscore_model_info" and sample.value == 1:
                out["serving"] = sample.labels.get("serving") or None
                out["active_seen"] = sample.labels.get("active") or None
            elif sample.name == "fraudscore_model_mismatch":
                out["mismatch_gauge"] = bool(sample.value)
    if out["mismatch_gauge"] is None:
        fail(f"--metrics {server}: {url} has no fraudscore_model_* metrics (is it a fraudscore metrics port?)", 1)
    return out


@model_app.command("status")
def model_status(
    server: Annotated[list[str] | None, typer.Option("--metrics", help="A running server's metrics endpoint host:port "
                                                      "(FRAUDSCORE_METRICS_PORT; repeat for each worker).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The registry's active version and, with --metrics, the version each server serves; exit 1 on a mismatch.

    One line per fact: ``registry active``, ``serving <server>`` for each --metrics, ``mismatch yes|no``.
    A mismatch (a server not serving the registry's active version, e.g. it refused a damaged artifact)
    or no active version exits 1."""
    active = bootstrap.registry(cli_settings()).active()
    active_version = active.version if active else None
    servers = [_serving_versions(s) for s in server or []]
    for s in servers:
        s["mismatch"] = bool(s["mismatch_gauge"]) or s["serving"] != active_version
    mismatch = active_version is None or any(s["mismatch"] for s in servers)
    if as_json:
        print(json.dumps({"registry_active": active_version, "servers": servers,
                          "mismatch": mismatch if servers or active_version is None else None}))
    else:
        print(f"registry active: {active_version or 'none'}")
        for s in servers:
            print(f"serving {s['server']}: {s['serving'] or 'nothing (NOT_SERVING)'}")
        print(f"mismatch: {'yes' if mismatch else 'no'}" if servers or active_version is None
              else "mismatch: unknown (give --metrics HOST:METRICS_PORT)")
    if mismatch:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations (creates the schema on a new database)."""
    bootstrap.sql_engine(cli_settings())
    console.print("database at the newest migration")


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(retrain)
    app.add_typer(model_app, name="model")
    app.add_typer(db_app, name="db")
