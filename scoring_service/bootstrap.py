"""The composition root: the one module that reads :class:`~scoring_service.config.Settings`.

It builds the concrete adapters (SQL engine and registry, Redis cache and writer, model loader,
event source) and hands plain values and those adapters to the use cases of ``serve``,
``nightly``, ``replay`` and the benchmarks. Nothing below it (core, adapters, online, batch,
training) reads the configuration or the environment, so each can be tested with plain values
and fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError
from scoring_service.adapters.redis.embedded import EmbeddedRedis, NoRedisError, resolve_redis_url
from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
from scoring_service.adapters.sql.db import Engine, make_engine, upgrade_schema
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.config import Settings
from scoring_service.logging import get_logger
from scoring_service.online.options import ModelOptions, RequestOptions, ServerOptions
from scoring_service.online.runtime import run_event_loop, serve_until_signalled
from scoring_service.online.server import ModelLoader, ScoringServer

log = get_logger(__name__)


# ---- durable state
def sql_engine(settings: Settings) -> Engine:
    """The configured database, migrated to the newest schema."""
    url = settings.resolved_database_url()
    upgrade_schema(url)
    return make_engine(url)


def registry(settings: Settings) -> Registry:
    """The model registry on the configured database (migrated first)."""
    return Registry(sql_engine(settings))


# ---- the cache
def redis_url(settings: Settings) -> str:
    """The configured Redis, else the embedded one a running ``serve`` started (NoRedisError if none)."""
    return resolve_redis_url(settings.redis_url, settings.data_dir)


def embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """An embedded valkey server for ``serve`` when no Redis is configured (not started yet)."""
    if settings.redis_url:
        return None
    return EmbeddedRedis(settings.data_dir)


def entity_cache(settings: Settings, url: str) -> EntityCache:
    """The request path's cache: one pipelined connection, short timeouts, a circuit breaker."""
    return EntityCache(
        url,
        timeout_s=settings.redis_timeout_ms / 1000.0,
        ttl_s=settings.cache_ttl_s,
        breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
    )


# ---- models
def demo_model_allowed(settings: Settings) -> bool:
    """The demo model only where nobody configured anything (embedded defaults), unless asked for."""
    if settings.demo_model is not None:
        return settings.demo_model
    return not settings.database_url and not settings.redis_url


def ensure_model(settings: Settings) -> ModelRecord | None:
    """The active model; with none, the demo model trained on simulated payments where it is
    allowed (``demo_model_allowed``), else None: the service starts NOT_SERVING and its registry
    watcher serves the first version activated."""
    reg = registry(settings)
    if not demo_model_allowed(settings):
        active = reg.active()
        if active is None:
            log.error("model.none_active", reason="no active model and no demo model outside the embedded mode",
                      fix="fraudscore train --data FILE (activates it), or FRAUDSCORE_DEMO_MODEL=true")
        return active
    from scoring_service.training.demo import ensure_model as ensure_demo_model

    return ensure_demo_model(reg, settings.models_dir)


def model_loader(settings: Settings, *, device: str | None = None, threads: int | None = None) -> ModelLoader:
    """Loads a registered version: checksum, feature names, device (``settings.device`` unless given)."""

    def load(record: ModelRecord) -> GbdtModel:
        return GbdtModel.load(record.artifact_path, record.framework, record.feature_names,
                              expected_sha256=record.sha256, device=device or settings.device,
                              nthread=threads or settings.model_threads, forest_max_rows=settings.forest_max_rows)

    return load


def model_options(settings: Settings) -> ModelOptions:
    return ModelOptions(
        reasons=settings.reasons,
        batch_max_size=settings.batch_max_size,
        batch_max_wait_ms=settings.batch_max_wait_ms,
        batch_inline_max_rows=settings.batch_inline_max_rows,
    )


# ---- the online service
def request_options(settings: Settings) -> RequestOptions:
    return RequestOptions(
        budget_ms=settings.budget_ms,
        default_currency=settings.default_currency,
        max_batch_request=settings.max_batch_request,
        log_sample_rate=settings.log_sample_rate if settings.log_requests else 0.0,
    )


def server_options(settings: Settings) -> ServerOptions:
    # In-flight calls get the request budget and 2 s more to finish once the drain is over.
    return ServerOptions(listen=settings.listen, registry_poll_s=settings.registry_poll_s,
                         metrics_port=settings.metrics_port, drain_s=settings.drain_s,
                         stop_grace_s=settings.budget_ms / 1000.0 + 2.0, max_in_flight=settings.max_in_flight,
                         min_call_time_ms=settings.min_call_time_ms, pushback_ms=int(settings.budget_ms))


def scoring_server(settings: Settings, redis_url: str | None) -> ScoringServer:
    """One server process with its registry, cache (None without a Redis) and options."""
    return ScoringServer(
        Registry(make_engine(settings.resolved_database_url())),
        entity_cache(settings, redis_url) if redis_url else None,
        model_loader(settings),
        mode=settings.mode,
        intraday=settings.intraday,
        fallback_min_decision=settings.fallback_min_decision,
        model_options=model_options(settings),
        request_options=request_options(settings),
        server_options=server_options(settings),
    )


def serve(settings: Settings, redis_url: str | None, parent_pid: int | None = None) -> None:
    """Run one server process on the configured event loop until SIGTERM/SIGINT (or, for a worker
    of ``--workers N``, until its parent ``parent_pid`` is gone), then drain and stop."""
    metrics_addr = settings.listen.rsplit(":", 1)[0].strip("[]")
    server = scoring_server(settings, redis_url)
    run_event_loop(serve_until_signalled(server, settings.metrics_port, metrics_addr, parent_pid), settings.event_loop)


# ---- batch jobs
# Builders for ``nightly``, ``replay`` and ``rebuild_cache``: the event source (Kafka when configured,
# else a Parquet file), the Redis cache writer, the run log and the active model, handed to the use
# cases of ``scoring_service.batch`` (which take plain values and adapters, never the settings).
# Imported lazily: ``serve`` does not load Kafka, the batch pipeline or the model loader for them.
if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
    from scoring_service.adapters.sql.runs import RunRecorder
    from scoring_service.batch.pipeline import BatchAdapters, BatchResult
    from scoring_service.batch.ports import ActiveModel, CacheWriter
    from scoring_service.batch.sources import EventSource

NO_EVENT_SOURCE = ("no event source: set KAFKA_BOOTSTRAP_SERVERS, or pass --source FILE "
                   "(or FRAUDSCORE_EVENTS_FILE) to read events from a parquet file")


def event_source(settings: Settings, *, job: str, group_id: str | None = None, workers: int = 1,
                 source: str | Path | None = None) -> EventSource:
    """Kafka when configured (topics ``<prefix>.payments``/``.labels``/``.dead-letter``), else the
    Parquet file ``source`` (``--source``) or ``settings.events_file``; BatchError when neither."""
    from scoring_service.batch.pipeline import BatchError

    if settings.kafka_bootstrap:
        from scoring_service.adapters.kafka.source import KafkaEventSource

        return KafkaEventSource(settings.kafka_bootstrap, payments_topic=settings.topic("payments"),
                                labels_topic=settings.topic("labels"), dead_letter_topic=settings.topic("dead-letter"),
                                job=job, group_id=group_id or f"fraudscore-{job}", workers=workers)
    path = source or settings.events_file
    if not path:
        raise BatchError(NO_EVENT_SOURCE)
    from scoring_service.adapters.files.event_source import FileEventSource

    return FileEventSource(path)


def batch_cache_writer(settings: Settings, url: str | None = None, *, connections: int = 4) -> RedisCacheWriter:
    """Writes generations to ``url``, else the configured (or running embedded) Redis; BatchError if none."""
    from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
    from scoring_service.batch.pipeline import BatchError

    try:
        return RedisCacheWriter(url or redis_url(settings), settings.cache_ttl_s, connections)
    except NoRedisError as exc:
        raise BatchError(str(exc)) from None


def run_recorder(settings: Settings, engine: Engine | None = None) -> RunRecorder:
    """``batch_runs``/``batch_offsets`` on ``engine``, else the configured database (migrated first)."""
    from scoring_service.adapters.sql.runs import RunRecorder

    return RunRecorder(engine or sql_engine(settings))


def active_model(settings: Settings, engine: Engine | None = None) -> ActiveModel:
    """The registry's active model, loaded for batch scoring (every core); BatchError if none or unloadable."""
    import os

    from scoring_service.batch.pipeline import BatchError
    from scoring_service.batch.ports import ActiveModel

    record = Registry(engine or sql_engine(settings)).active()
    if record is None:
        raise BatchError("no active model in the registry: train one first (`fraudscore train`)")
    try:
        model = model_loader(settings, threads=os.cpu_count() or 1)(record)
    except ModelError as exc:
        raise BatchError(f"cannot load model {record.version}: {exc}") from None
    return ActiveModel(record.version, model, float(record.policy.get("typical_amount", 0.0)))


def batch_adapters(settings: Settings, source: EventSource, *, redis_url: str | None = None,
                   writer: CacheWriter | None = None, model: ActiveModel | tuple[Any, Any] | None = None) -> BatchAdapters:
    """``source`` with the configured cache writer, run log and active model (``model``: given
    instead, an ActiveModel or a (registry record, loaded model) pair)."""
    from scoring_service.batch.pipeline import BatchAdapters
    from scoring_service.batch.ports import ActiveModel

    if isinstance(model, tuple):
        model = ActiveModel(model[0].version, model[1])
    writer = writer or batch_cache_writer(settings, redis_url)
    engine = sql_engine(settings)
    return BatchAdapters(source=source, writer=writer, runs=run_recorder(settings, engine),
                         model=model or active_model(settings, engine))


def run_nightly(settings: Settings, *, as_of: float | None = None, group_id: str | None = None, workers: int = 1,
                source: str | Path | None = None, redis_url: str | None = None, show_progress: bool | None = None,
                writer: CacheWriter | None = None) -> BatchResult:
    """``fraudscore nightly``: rebuild the cache from the feature window's events as of ``as_of``."""
    from scoring_service.batch.pipeline import run_batch

    events = event_source(settings, job="nightly", group_id=group_id, workers=workers, source=source)
    adapters = batch_adapters(settings, events, redis_url=redis_url, writer=writer)
    return run_batch(adapters, job="nightly", as_of=as_of, show_progress=show_progress)


def replay_cache(settings: Settings, frm: str | None, to: str | None, *, group_id: str | None = None,
                 workers: int = 1, source: str | Path | None = None, redis_url: str | None = None,
                 show_progress: bool | None = None) -> BatchResult:
    """``fraudscore replay``: rebuild the cache as of ``to`` from the events in [``frm``, ``to``)."""
    from scoring_service.batch import replay

    events = event_source(settings, job="replay", group_id=group_id, workers=workers, source=source)
    replay.check_bounds(events, frm, to)  # bad bounds fail before Redis, the database and the model are touched
    return replay.replay_cache(batch_adapters(settings, events, redis_url=redis_url), frm, to, show_progress=show_progress)


def replay_through_service(settings: Settings, address: str, frm: str | None, to: str | None, *, speed: float = 0.0,
                           concurrency: int = 32, source: str | Path | None = None, limit: int | None = None,
                           timeout_s: float = 2.0, show_progress: bool | None = None) -> dict[str, Any]:
    """``fraudscore replay --through-service``: the window's payments as Score() calls; the served metrics."""
    from scoring_service.batch import replay

    events = event_source(settings, job="replay", group_id="fraudscore-replay-service", source=source)
    return replay.replay_through_service(events, address, frm, to, speed=speed, concurrency=concurrency, limit=limit,
                                         timeout_s=timeout_s, show_progress=show_progress)


def rebuild_cache(payments: pd.DataFrame, as_of: Any, settings: Settings, *, redis_url: str | None = None,
                  model: ActiveModel | tuple[Any, Any] | None = None, job: str = "rebuild",
                  show_progress: bool | None = False) -> BatchResult:
    """The nightly run on an in-memory normalised payments frame (benchmarks, tests; no Kafka).

    ``payments`` may hold labels for every payment: only those that had arrived by ``as_of``
    (payment time + the label delay) are used, as on Kafka.
    """
    from scoring_service.adapters.files.event_source import FileEventSource
    from scoring_service.batch.pipeline import run_batch
    from scoring_service.core.features import epoch_seconds

    adapters = batch_adapters(settings, FileEventSource(frame=payments), redis_url=redis_url, model=model)
    return run_batch(adapters, job=job, as_of=epoch_seconds(as_of), show_progress=show_progress)
