"""The batch commands of ``fraudscore``: ``nightly``, ``replay`` and ``events publish``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings(**overrides: Any):  # type: ignore[no-untyped-def]
    from scoring_service.config import load_settings
    from scoring_service.logging import configure_logging

    kafka = overrides.pop("kafka_bootstrap", None)  # aliased field: not settable by its name
    try:
        settings = load_settings(**overrides)
        if kafka:
            settings = settings.model_copy(update={"kafka_bootstrap": kafka})
    except Exception as exc:
        raise _fail(f"invalid configuration: {exc}") from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _time(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    from scoring_service.core.features import epoch_seconds

    try:
        return epoch_seconds(value)
    except (ValueError, TypeError):
        raise _fail(f"{name}: not a time: {value!r} (ISO 8601, a date, or epoch seconds)") from None


def _print_result(result: Any, as_json: bool) -> None:
    data = result.to_json()
    if as_json or not sys.stdout.isatty():
        print(json.dumps(data, default=str))
        return
    from rich.table import Table

    t = Table(title=f"{data['job']} run {data['run_id']}: {data['status']}")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k in ("model_version", "generation", "previous_generation", "events_consumed", "dead_letters",
              "entities_scored", "keys_written", "duration_s"):
        t.add_row(k, str(data[k]))
    for k, v in data["phases"].items():
        t.add_row(f"phase {k} (s)", str(v))
    console.print(t)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Expected failures -> a message and exit 2 (1 for Kafka/Redis unavailable); no traceback."""
    from scoring_service.adapters.redis.cache_writer import CacheWriteError
    from scoring_service.batch.events import EventError
    from scoring_service.adapters.kafka.kafka_io import KafkaUnavailable
    from scoring_service.batch.pipeline import BatchError

    try:
        return fn(*args, **kwargs)
    except (KafkaUnavailable, CacheWriteError) as exc:
        raise _fail(str(exc), 1) from None
    except BatchError as exc:
        raise _fail(str(exc), 1 if "unreachable" in str(exc) or "Redis" in str(exc) else 2) from None
    except EventError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted: the previous cache generation is still serving", 130) from None


def register(app: typer.Typer) -> None:
    events_app = typer.Typer(help="Payment and label events on Kafka.", no_args_is_help=True)
    app.add_typer(events_app, name="events")

    @app.command()
    def nightly(
        as_of: Annotated[str | None, typer.Option("--as-of", help="Build the cache as of this time (default now).")] = None,
        group_id: Annotated[str | None, typer.Option("--group-id", help="Kafka consumer group.")] = None,
        workers: Annotated[int, typer.Option(min=1, help="Consumer processes splitting the partitions.")] = 1,
        source: Annotated[Path | None, typer.Option(help="Events from this parquet file when no Kafka is configured.")] = None,
        kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers (else KAFKA_BOOTSTRAP_SERVERS).")] = None,
        redis_url: Annotated[str | None, typer.Option(help="Redis URL (else REDIS_URL / the embedded one).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
    ) -> None:
        """Rebuild the entity cache from the feature window's events; switch to it atomically."""
        from scoring_service.batch.pipeline import run_nightly

        settings = _settings(kafka_bootstrap=kafka, redis_url=redis_url)
        result = _run(run_nightly, settings, as_of=_time(as_of, "--as-of"), group_id=group_id, workers=workers,
                      source=source)
        _print_result(result, as_json)

    @app.command()
    def replay(
        frm: Annotated[str | None, typer.Option("--from", help="Start: a time, or partition:offset[,p:o].")] = None,
        to: Annotated[str | None, typer.Option("--to", help="End (exclusive): a time, or partition:offset[,p:o].")] = None,
        through_service: Annotated[str | None, typer.Option(help="Send the payments to this gRPC address instead.")] = None,
        speed: Annotated[float, typer.Option(min=0.0, help="Pace x original (0 = as fast as possible).")] = 0.0,
        concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight (--through-service).")] = 32,
        limit: Annotated[int | None, typer.Option(min=1, help="Send at most this many payments.")] = None,
        group_id: Annotated[str | None, typer.Option("--group-id")] = None,
        workers: Annotated[int, typer.Option(min=1)] = 1,
        source: Annotated[Path | None, typer.Option(help="Events from this parquet file when no Kafka is configured.")] = None,
        kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers.")] = None,
        redis_url: Annotated[str | None, typer.Option()] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        output: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
    ) -> None:
        """Rebuild the cache for a past window, or replay its payments through the service."""
        from scoring_service.batch import replay as rp

        settings = _settings(kafka_bootstrap=kafka, redis_url=redis_url)
        if through_service:
            report = _run(rp.replay_through_service, settings, through_service, frm, to, speed=speed,
                          concurrency=concurrency, source=str(source) if source else None, limit=limit)
            if output:
                output.write_text(json.dumps(report, indent=2, default=str))
            if as_json or not sys.stdout.isatty():
                print(json.dumps(report, default=str))
            else:
                console.print(rp.report_table(report))
            if report["requests"] and report["errors"] == report["requests"]:
                raise _fail(f"every request to {through_service} failed", 1)
            return
        result = _run(rp.replay_cache, settings, frm, to, group_id=group_id, workers=workers,
                      source=str(source) if source else None)
        _print_result(result, as_json)

    @events_app.command("publish")
    def publish(
        parquet: Annotated[Path, typer.Option("--parquet", help="Handbook-format (or normalised) parquet file.")],
        label_delay_days: Annotated[float, typer.Option(min=0.0, help="Labels are stamped payment time + this.")] = 7.0,
        topic_prefix: Annotated[str | None, typer.Option(help="Topics <prefix>.payments / .labels.")] = None,
        partitions: Annotated[int, typer.Option(min=1, help="Partitions of topics created here.")] = 4,
        since: Annotated[str | None, typer.Option(help="Only payments at or after this time.")] = None,
        until: Annotated[str | None, typer.Option(help="Only payments before this time.")] = None,
        kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers.")] = None,
    ) -> None:
        """Publish payments (their own times) and labels (payment time + delay) to Kafka."""
        from scoring_service.batch import events as ev
        from scoring_service.adapters.kafka import kafka_io
        from scoring_service.batch.progress import Progress

        settings = _settings(kafka_bootstrap=kafka, kafka_topic_prefix=topic_prefix)
        if not settings.kafka_bootstrap:
            raise _fail("no Kafka configured: set KAFKA_BOOTSTRAP_SERVERS or pass --kafka")
        if not parquet.exists():
            raise _fail(f"--parquet: {parquet} does not exist")
        try:
            frame = ev.read_payments_file(parquet)
        except (ev.EventError, OSError, ValueError) as exc:
            raise _fail(f"--parquet: {exc}") from None
        lo, hi = _time(since, "--since"), _time(until, "--until")
        if lo is not None or hi is not None:
            ts = frame["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64") / 1e9
            keep = (ts >= (lo if lo is not None else -1e18)) & (ts < (hi if hi is not None else 1e18))
            frame = frame.loc[keep].reset_index(drop=True)
        total = len(frame) * (2 if "is_fraud" in frame.columns else 1)
        with Progress("publish") as prog, prog.phase("publish", total) as adv:
            stats = _run(kafka_io.publish_frame, settings.kafka_bootstrap, settings.topic("payments"),
                         settings.topic("labels"), frame, label_delay_days=label_delay_days,
                         partitions=partitions, progress=adv)
        out = {"payments": stats.payments, "labels": stats.labels, "labels_skipped_future": stats.labels_skipped_future,
               "seconds": round(stats.seconds, 3), "events_per_s": round(stats.events_per_s)}
        if sys.stdout.isatty():
            console.print(f"published {stats.payments:,} payments and {stats.labels:,} labels "
                          f"({stats.labels_skipped_future:,} future labels skipped) in {stats.seconds:.1f} s: "
                          f"[bold]{stats.events_per_s:,.0f} events/s[/]")
        else:
            print(json.dumps(out))
