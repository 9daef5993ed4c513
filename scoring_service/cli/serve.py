"""``fraudscore serve``: the gRPC scoring service, in one process or several sharing the port."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Annotated

import typer

from scoring_service import bootstrap
from scoring_service.cli.common import cli_settings, fail
from scoring_service.config import ScoringMode, Settings
from scoring_service.logging import configure_logging, get_logger


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: each process serves its own metrics on ``metrics_port + index``."""
    if settings.metrics_port is None:
        return settings
    return settings.model_copy(update={"metrics_port": settings.metrics_port + index})


def _worker_main(settings_json: str, redis_url: str | None) -> None:
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_format, settings.log_level)
    bootstrap.serve(settings, redis_url)


def serve(
    listen: Annotated[str | None, typer.Option(help="Address to listen on [FRAUDSCORE_LISTEN, 127.0.0.1:50051].")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes sharing the port [FRAUDSCORE_WORKERS, 1].")] = None,
    mode: Annotated[ScoringMode | None, typer.Option(help="cache-first or always-model [FRAUDSCORE_MODE].")] = None,
    device: Annotated[str | None, typer.Option(help="Model device: auto, cpu, cuda [FRAUDSCORE_DEVICE].")] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Latency budget per request in ms [FRAUDSCORE_BUDGET_MS, 100].")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder for SQLite, models, embedded Redis [FRAUDSCORE_DATA_DIR, ./var].")
    ] = None,
) -> None:
    """Run the gRPC scoring service (embedded defaults: SQLite, in-process valkey, a demo model)."""
    settings = cli_settings(listen=listen, workers=workers, mode=mode, device=device, budget_ms=budget_ms, data_dir=data_dir)
    log = get_logger("fraudscore.serve")
    from scoring_service.adapters.model.gbdt import choose_device

    log.info("model.device", requested=settings.device, chosen=choose_device(settings.device))
    embedded = bootstrap.embedded_redis(settings)
    redis_url = settings.redis_url
    if embedded is not None:
        redis_url = embedded.start()
        log.info("redis.embedded_started", url=redis_url, note="set REDIS_URL to use your own Redis")
    try:
        bootstrap.ensure_model(settings)
        if settings.workers == 1:
            bootstrap.serve(settings, redis_url)
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
        from scoring_service.online.runtime import join_workers

        codes = join_workers(procs)
        if any(codes):
            fail(f"worker exit codes {codes}", 1)
    finally:
        if embedded is not None:
            embedded.stop()


def register(app: typer.Typer) -> None:
    app.command()(serve)
