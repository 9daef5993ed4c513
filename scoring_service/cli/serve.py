"""``fraudscore serve``: the gRPC scoring service, in one process or several sharing the port."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Annotated

import typer

from scoring_service import bootstrap
from scoring_service.adapters.sql.db import DatabaseUnavailable
from scoring_service.cli.common import cli_settings, fail
from scoring_service.config import ScoringMode, Settings
from scoring_service.logging import LogRelay, configure_logging, get_logger
from scoring_service.online.runtime import PortInUse, claim_port, die_with_parent, join_workers


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: each process serves its own metrics on ``metrics_port + index``."""
    if settings.metrics_port is None:
        return settings
    return settings.model_copy(update={"metrics_port": settings.metrics_port + index})


def _worker_main(settings_json: str, redis_url: str | None, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_format, settings.log_level)
    bootstrap.serve(settings, redis_url, parent_pid)


def _serve_workers(settings: Settings, redis_url: str | None) -> None:
    """``--workers N``: start them, restart those that die, forward SIGTERM/SIGINT, return once all have drained."""
    ctx = multiprocessing.get_context("spawn")
    parent_pid = os.getpid()
    relay = LogRelay()  # the workers' lines reach our stderr whole, through this process (issue 27)

    def start_worker(index: int) -> BaseProcess:
        return relay.process(ctx, _worker_main, (_worker_settings(settings, index).model_dump_json(), redis_url, parent_pid),
                             name=f"scorer-{index}")

    procs = [start_worker(i) for i in range(settings.workers)]
    get_logger("fraudscore.serve").info("server.workers", count=len(procs), pids=[p.pid for p in procs])
    options = bootstrap.server_options(settings)
    codes = join_workers(procs, start_worker, stop_timeout_s=options.drain_s + options.stop_grace_s + 10.0)
    relay.join()  # the workers' last lines (server.stopped) are written before ours
    # A worker signalled before its event loop ran (still loading) stopped with the signal: it served nothing.
    if any(code not in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes):
        fail(f"worker exit codes {codes}", 1)


def serve(
    listen: Annotated[str | None, typer.Option(help="Address to listen on [FRAUDSCORE_LISTEN, 127.0.0.1:50051].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Server processes sharing the port; one that dies is restarted [FRAUDSCORE_WORKERS, 1].")
    ] = None,
    mode: Annotated[ScoringMode | None, typer.Option(help="cache-first or always-model [FRAUDSCORE_MODE].")] = None,
    device: Annotated[str | None, typer.Option(help="Model device: auto, cpu, cuda [FRAUDSCORE_DEVICE].")] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Latency budget per request in ms [FRAUDSCORE_BUDGET_MS, 100].")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder for SQLite, models, embedded Redis [FRAUDSCORE_DATA_DIR, ./var].")
    ] = None,
    drain_s: Annotated[
        float | None, typer.Option(help="On SIGTERM: seconds of NOT_SERVING health while still serving [FRAUDSCORE_DRAIN_S, 5].")
    ] = None,
    demo_model: Annotated[
        bool | None, typer.Option("--demo-model/--no-demo-model", help="With no active model, train the demo model "
                                  "[FRAUDSCORE_DEMO_MODEL; default: only with nothing configured].")
    ] = None,
    allow_shared_port: Annotated[
        bool | None, typer.Option("--allow-shared-port", help="Start even if another process serves the port "
                                  "(SO_REUSEPORT shares it) [FRAUDSCORE_ALLOW_SHARED_PORT]; default: refuse, exit 1.")
    ] = None,
) -> None:
    """Run the gRPC scoring service (embedded defaults: SQLite, in-process valkey, a demo model).

    SIGTERM drains: health NOT_SERVING at once, still serving for the drain period, then the calls
    in flight finish and it exits 0. With --workers N, a worker that dies is restarted.
    """
    settings = cli_settings(listen=listen, workers=workers, mode=mode, device=device, budget_ms=budget_ms, data_dir=data_dir,
                            drain_s=drain_s, allow_shared_port=allow_shared_port, demo_model=demo_model)
    log = get_logger("fraudscore.serve")
    port_lock = None
    if not settings.allow_shared_port:
        try:
            port_lock = claim_port(settings.listen)
        except PortInUse as exc:
            fail(f"{exc}: not starting a second server on it. Stop the other one or choose another --listen; "
                 "--allow-shared-port (FRAUDSCORE_ALLOW_SHARED_PORT=true) shares the port on purpose.", 1)
    try:  # TLS half-configured: a clear error; plaintext, authentication off: a warning (docs/security.md)
        bootstrap.check_security(settings)
    except ValueError as exc:
        fail(str(exc))
    from scoring_service.adapters.model.gbdt import choose_device

    log.info("model.device", requested=settings.device, chosen=choose_device(settings.device))
    embedded = bootstrap.embedded_redis(settings)
    redis_url = settings.redis_url
    if embedded is not None:
        redis_url = embedded.start()
        log.info("redis.embedded_started", url=redis_url, note="set REDIS_URL to use your own Redis")
    try:
        bootstrap.check_redis(settings, redis_url)  # MAC keys, Redis credentials/TLS: exit 1 naming them
        try:
            bootstrap.ensure_model(settings)
        except DatabaseUnavailable as exc:  # one line naming the database (never wrapped), no traceback
            print(f"error: {exc} (the model registry; FRAUDSCORE_DATABASE_URL): not serving", file=sys.stderr)
            raise typer.Exit(1) from None
        if settings.workers == 1:
            bootstrap.serve(settings, redis_url)
        else:
            _serve_workers(settings, redis_url)
    finally:
        if embedded is not None:
            embedded.stop()
        if port_lock is not None:
            port_lock.close()


def register(app: typer.Typer) -> None:
    app.command()(serve)
