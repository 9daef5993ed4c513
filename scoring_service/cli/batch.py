"""The batch commands of ``fraudscore``: ``nightly``, ``replay`` and ``events publish``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from scoring_service.cli.client import ApiKey, TlsCa, TlsCert, TlsKey, TlsServerName
from scoring_service.cli.common import cli_settings, console, fail, parse_time
from scoring_service.core.features import LABEL_DELAY_DAYS


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
    """Expected failures -> a message and exit 2 (1 for Kafka/Redis unavailable); no traceback.
    A missing topic is 2: the brokers answer, the prefix or the publishing is wrong."""
    from scoring_service.adapters.kafka.kafka_io import KafkaUnavailable, TopicMissing
    from scoring_service.adapters.redis.cache_writer import CacheWriteError
    from scoring_service.adapters.sql.db import DatabaseUnavailable
    from scoring_service.batch.pipeline import BatchError
    from scoring_service.core.events import EventError

    try:
        return fn(*args, **kwargs)
    except (KafkaUnavailable, CacheWriteError, DatabaseUnavailable) as exc:
        fail(str(exc), 1)
    except TopicMissing as exc:  # raised before a run (replay's offset bounds): nothing recorded or switched
        fail(f"{exc}; nothing recorded or switched, the previous cache generation keeps serving")
    except BatchError as exc:
        fail(str(exc), 1 if "unreachable" in str(exc) or "Redis" in str(exc) else 2)
    except EventError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted: the previous cache generation is still serving", 130)


METRICS_PORT_HELP = ("Serve the run's Prometheus metrics on this port while it runs, and until one scrape after "
                     "(else FRAUDSCORE_BATCH_METRICS_PORT; default off).")


@contextmanager
def _metrics(settings: Any, job: str) -> Iterator[Any]:
    """The run's metrics (BatchMetrics), served on the configured port while the block runs; a clear error
    (exit 2) if the port cannot be listened on."""
    from scoring_service import bootstrap

    exporter = _run(bootstrap.batch_metrics, settings, job)
    with exporter as metrics:
        try:
            yield metrics
        except typer.Exit as exc:
            if exc.exit_code == 130 and hasattr(exporter, "linger_s"):
                exporter.linger_s = 0  # interrupted (Ctrl-C): close the port at once, no waiting for a scrape
            raise


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
        metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=1, max=65535,
                                                         help=METRICS_PORT_HELP)] = None,
    ) -> None:
        """Rebuild the entity cache from the feature window's events; switch to it atomically.

        A window without payments (an --as-of after the events, producers stopped) fails with exit 2
        and switches nothing: the previous cache generation keeps serving (docs/faults.md)."""
        from scoring_service import bootstrap

        settings = cli_settings(kafka_bootstrap=kafka, redis_url=redis_url, batch_metrics_port=metrics_port)
        at = parse_time(as_of, "--as-of")
        with _metrics(settings, "nightly") as metrics:
            result = _run(bootstrap.run_nightly, settings, as_of=at, group_id=group_id, workers=workers,
                          source=source, metrics=metrics)
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
        metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=1, max=65535,
                                                         help=METRICS_PORT_HELP + " Cache rebuilds only.")] = None,
        tls_ca: TlsCa = None,
        tls_cert: TlsCert = None,
        tls_key: TlsKey = None,
        tls_server_name: TlsServerName = None,
        api_key: ApiKey = None,
    ) -> None:
        """Rebuild the cache for a past window, or replay its payments through the service
        (--through-service: with --tls-ca/--tls-cert/--tls-key and --api-key or FRAUDSCORE_API_KEY)."""
        from scoring_service import bootstrap
        from scoring_service.batch.replay import report_table

        settings = cli_settings(kafka_bootstrap=kafka, redis_url=redis_url, batch_metrics_port=metrics_port)
        if through_service:
            tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key, "tls_server_name": tls_server_name}
            try:
                report = _run(bootstrap.replay_through_service, settings, through_service, frm, to, speed=speed,
                              concurrency=concurrency, source=source, limit=limit, tls=tls,
                              api_key=(api_key or "").strip() or None)
            except ValueError as exc:  # unreadable TLS files, a certificate without its key
                fail(str(exc), 2)
            if output:
                output.write_text(json.dumps(report, indent=2, default=str))
            if as_json or not sys.stdout.isatty():
                print(json.dumps(report, default=str))
            else:
                console.print(report_table(report))
            if report["requests"] and report["errors"] == report["requests"]:
                fail(f"every request to {through_service} failed", 1)
            return
        with _metrics(settings, "replay") as metrics:
            result = _run(bootstrap.replay_cache, settings, frm, to, group_id=group_id, workers=workers,
                          source=source, metrics=metrics)
            _print_result(result, as_json)

    @events_app.command("publish")
    def publish(
        parquet: Annotated[Path, typer.Option("--parquet", help="Handbook-format (or normalised) parquet file.")],
        label_delay_days: Annotated[float, typer.Option(min=0.0, help="Labels are stamped payment time + this.")] = float(
            LABEL_DELAY_DAYS),
        topic_prefix: Annotated[str | None, typer.Option(help="Topics <prefix>.payments / .labels.")] = None,
        partitions: Annotated[int, typer.Option(min=1, help="Partitions of topics created here.")] = 4,
        since: Annotated[str | None, typer.Option(help="Only payments at or after this time.")] = None,
        until: Annotated[str | None, typer.Option(help="Only payments before this time.")] = None,
        kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers.")] = None,
    ) -> None:
        """Publish payments (their own times) and labels (payment time + delay) to Kafka."""
        from scoring_service.adapters.files.payments_file import read_payments_file
        from scoring_service.adapters.kafka import kafka_io
        from scoring_service.batch.progress import Progress

        settings = cli_settings(kafka_bootstrap=kafka, kafka_topic_prefix=topic_prefix)
        if not settings.kafka_bootstrap:
            fail("no Kafka configured: set KAFKA_BOOTSTRAP_SERVERS or pass --kafka")
        if not parquet.exists():
            fail(f"--parquet: {parquet} does not exist")
        try:
            frame = read_payments_file(parquet)
        except (OSError, ValueError) as exc:
            fail(f"--parquet: {exc}")
        lo, hi = parse_time(since, "--since"), parse_time(until, "--until")
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
