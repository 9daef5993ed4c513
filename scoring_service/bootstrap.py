"""The composition root: the one module that reads :class:`~scoring_service.config.Settings`.

It builds the concrete adapters (SQL engine and registry, Redis cache and writer, model loader,
event source) and hands plain values and those adapters to the use cases of ``serve``,
``nightly``, ``replay`` and the benchmarks. Nothing below it (core, adapters, online, batch,
training) reads the configuration or the environment, so each can be tested with plain values
and fakes.

Length: one builder per adapter and use case (the online service, the batch jobs, security: TLS,
API keys, rate limits, the cache's MAC keys, Redis TLS and the log keys) is what a composition root
is; splitting it would scatter the one place that reads the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError
from scoring_service.adapters.redis.embedded import EmbeddedRedis, NoRedisError, resolve_redis_url
from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.sql.db import Engine, make_engine, upgrade_schema
from scoring_service.adapters.sql.keys import KeyStore, pepper_file
from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.config import Settings
from scoring_service.core.integrity import MacKeyError, MacKeys
from scoring_service.logging import get_logger, register_secret, set_log_id_key
from scoring_service.online.admin import ADMIN_SERVICE
from scoring_service.online.auth import Authenticator, AuthInterceptor, Security
from scoring_service.online.options import Clock, ModelOptions, RequestOptions, ServerOptions, TimeTrust
from scoring_service.online.runtime import run_event_loop, serve_until_signalled
from scoring_service.online.server import SERVICE_NAME, ModelLoader, ScoringServer
from scoring_service.online.tls import check_paths, server_credentials

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
    return redis_tls_url(settings, resolve_redis_url(settings.redis_url, settings.data_dir))


def embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """An embedded valkey server for ``serve`` when no Redis is configured (not started yet)."""
    if settings.redis_url:
        return None
    if settings.redis_cluster:
        raise SystemExit("error: FRAUDSCORE_REDIS_CLUSTER=true needs REDIS_URL (a node of the cluster): not serving")
    return EmbeddedRedis(settings.data_dir)


def entity_cache(settings: Settings, url: str) -> EntityCache:
    """The request path's cache: one pipelined connection, short timeouts, a circuit breaker."""
    return EntityCache(
        url,
        timeout_s=settings.redis_timeout_ms / 1000.0,
        ttl_s=settings.cache_ttl_s,
        breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
        mac=cache_mac_keys(settings),
        cluster=settings.redis_cluster,
        intraday_ttl_s=settings.intraday_ttl_s,
        intraday_max_payments=settings.intraday_max_payments,
    )


# ---- the cache's integrity, Redis credentials and TLS, log ids (docs/security.md, "Cache and logs")
def redis_tls_url(settings: Settings, url: str) -> str:
    """``url`` with ``FRAUDSCORE_REDIS_TLS_CA/CERT/KEY`` as its TLS parameters (``rediss://`` only)."""
    from scoring_service.adapters.redis.resp import with_tls_files

    files = (settings.redis_tls_ca, settings.redis_tls_cert, settings.redis_tls_key)
    return with_tls_files(url, *(str(f) if f else None for f in files))


def cache_mac_keys(settings: Settings) -> MacKeys:
    """``FRAUDSCORE_CACHE_MAC_KEYS``, else the data directory's key (created on first use; warned
    outside the embedded mode, where every replica and batch job must be given the same keys)."""
    from scoring_service.adapters.redis.embedded import local_secret

    if settings.cache_mac_keys:
        return MacKeys.parse(settings.cache_mac_keys)
    try:
        secret = local_secret(settings.data_dir, "cache-mac.key")
    except OSError as exc:
        raise MacKeyError(f"FRAUDSCORE_CACHE_MAC_KEYS is unset and the local key cannot be kept: {exc}") from None
    register_secret(secret)
    if settings.redis_url:
        log.warning("cache.mac_key_local", path=str(settings.data_dir / "secrets" / "cache-mac.key"),
                    note="set FRAUDSCORE_CACHE_MAC_KEYS: entries sealed by another key are read as unseen")
    return MacKeys([("local", secret.encode())])


def protect_logs(settings: Settings) -> None:
    """Key the log id hash (``FRAUDSCORE_LOG_ID_KEY``, else the data directory's) and keep the
    configured secrets (the Redis password among them) out of every log line."""
    from urllib.parse import unquote, urlparse

    from scoring_service.adapters.redis.embedded import local_secret

    try:
        set_log_id_key(settings.log_id_key or local_secret(settings.data_dir, "log-id.key"))
    except OSError as exc:  # a read-only data directory: this process's random key (ids correlate per process)
        log.warning("logs.id_key_per_process", error=str(exc), note="set FRAUDSCORE_LOG_ID_KEY")
    for url in (settings.redis_url, settings.database_url):
        register_secret(unquote(urlparse(url).password or "") if url else None)
    for pepper in (settings.key_pepper or "").split(","):
        register_secret(pepper.strip())
    for item in (settings.cache_mac_keys or "").split(","):
        register_secret(item.partition(":")[2].strip())


def check_redis(settings: Settings, url: str | None) -> None:
    """At start: usable MAC keys, and a Redis that accepts our credentials and TLS; else exit 1
    with a message naming the setting or Redis (never the password). Unreachable is only warned
    (the service starts degraded and reconnects)."""
    from scoring_service.adapters.redis.resp import RedisRefused, check_connection, redact_url

    protect_logs(settings)
    try:
        cache_mac_keys(settings)
    except MacKeyError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not url:
        return
    url = redis_tls_url(settings, url)
    try:
        check_connection(url)
    except (RedisRefused, ValueError) as exc:
        raise SystemExit(f"error: {exc} (REDIS_URL, FRAUDSCORE_REDIS_TLS_*): not serving") from None
    except (OSError, TimeoutError) as exc:
        log.warning("redis.unreachable_at_start", redis=redact_url(url), error=type(exc).__name__)


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
                         min_call_time_ms=settings.min_call_time_ms, pushback_ms=int(settings.budget_ms),
                         max_queue_ms=settings.max_queue_ms, queue_from_deadline=settings.queue_from_deadline,
                         max_pending_calls=settings.max_pending_calls)


def scoring_server(settings: Settings, redis_url: str | None) -> ScoringServer:
    """One server process with its registry, cache (None without a Redis) and options."""
    server = ScoringServer(
        Registry(make_engine(settings.resolved_database_url())),
        entity_cache(settings, redis_url) if redis_url else None,
        model_loader(settings),
        mode=settings.mode,
        intraday=settings.intraday,
        fallback_min_decision=settings.fallback_min_decision,
        model_options=model_options(settings),
        request_options=request_options(settings),
        server_options=server_options(settings),
        security=security(settings, redis_url),
    )
    server.scorer.time_trust = TimeTrust(settings.clock, settings.max_clock_skew_s)
    if settings.clock is Clock.EVENT:
        log.warning("clock.event", note="velocity and the intraday order use the callers' timestamps: for replays and "
                    "backtests only, never live traffic (FRAUDSCORE_CLOCK=service)")
    from scoring_service.online import telemetry  # metrics, drift, shadow/canary, traces (docs/observability.md)

    telemetry.instrument(server, telemetry.ObservabilityOptions(
        drift_threshold=settings.drift_threshold, shadow_share=settings.shadow_share, shadow_queue=settings.shadow_queue,
        canary_share=settings.canary_share, otel=settings.otel, otel_endpoint=settings.otel_endpoint))
    return server


# ---- security (docs/security.md): TLS, API keys, rate limits
def key_peppers(settings: Settings) -> list[bytes]:
    """The API keys' HMAC secrets: FRAUDSCORE_KEY_PEPPER (comma-separated, first = current), else <data_dir>/key_pepper."""
    if settings.key_pepper:
        return [p.strip().encode() for p in settings.key_pepper.split(",") if p.strip()]
    return [pepper_file(settings.data_dir / "key_pepper")]


def key_store(settings: Settings, engine: Engine | None = None) -> KeyStore:
    """The ``api_keys`` table on ``engine``, else the configured database (migrated first)."""
    return KeyStore(engine or sql_engine(settings), key_peppers(settings))


def check_security(settings: Settings) -> None:
    """ValueError for a half-configured TLS; a warning for plaintext and for authentication off."""
    check_paths(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if settings.tls_cert is None:
        log.warning("security.plaintext", listen=settings.listen, fix="FRAUDSCORE_TLS_CERT, FRAUDSCORE_TLS_KEY")
    if settings.resolved_auth() == "off":
        log.warning("security.auth_off", listen=settings.listen, fix="FRAUDSCORE_AUTH=required",
                    note="anyone who reaches the port may score and change the registry")
    elif not settings.key_pepper and settings.database_url:
        log.warning("security.pepper_file", note="replicas sharing the database need one FRAUDSCORE_KEY_PEPPER")


def security(settings: Settings, redis_url: str | None) -> Security:
    """TLS credentials (when configured) and the auth interceptor (unless authentication is off)."""
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if settings.resolved_auth() == "off":
        return Security(None, credentials)
    auth = Authenticator(KeyStore(make_engine(settings.resolved_database_url()), key_peppers(settings)),
                         settings.auth_cache_ttl_s)
    return Security(AuthInterceptor(auth, RateLimiter(redis_url, timeout_s=settings.redis_timeout_ms / 1000.0,
                                                        cluster=settings.redis_cluster),
                                    {f"/{SERVICE_NAME}/": "score", f"/{ADMIN_SERVICE}/": "admin"},
                                    default_rate=settings.rate_limit_per_s, default_burst=settings.rate_limit_burst),
                    credentials)


def serve(settings: Settings, redis_url: str | None, parent_pid: int | None = None) -> None:
    """Run one server process on the configured event loop until SIGTERM/SIGINT (or, for a worker
    of ``--workers N``, until its parent ``parent_pid`` is gone), then drain and stop."""
    metrics_addr = settings.listen.rsplit(":", 1)[0].strip("[]")
    protect_logs(settings)
    redis_url = redis_tls_url(settings, redis_url) if redis_url else None
    server = scoring_server(settings, redis_url)
    run_event_loop(serve_until_signalled(server, settings.metrics_port, metrics_addr, parent_pid), settings.event_loop)


# ---- batch jobs
# Builders for ``nightly``, ``replay`` and ``rebuild_cache``: the event source (Kafka when configured,
# else a Parquet file), the Redis cache writer, the run log and the active model, handed to the use
# cases of ``scoring_service.batch`` (which take plain values and adapters, never the settings).
# Imported lazily: ``serve`` does not load Kafka, the batch pipeline or the model loader for them.
if TYPE_CHECKING:
    from contextlib import nullcontext
    from pathlib import Path

    import pandas as pd

    from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
    from scoring_service.adapters.sql.runs import RunRecorder
    from scoring_service.batch.metrics import BatchMetrics, MetricsExporter
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
    from scoring_service.adapters.redis.resp import RedisRefused, check_connection
    from scoring_service.batch.pipeline import BatchError

    protect_logs(settings)
    try:
        target = redis_tls_url(settings, url) if url else redis_url(settings)
        check_connection(target)  # a wrong password or certificate fails here, before any work
        return RedisCacheWriter(target, settings.cache_ttl_s, connections, mac=cache_mac_keys(settings),
                                cluster=settings.redis_cluster)
    except (NoRedisError, RedisRefused, MacKeyError) as exc:
        raise BatchError(str(exc)) from None
    except (OSError, TimeoutError) as exc:
        raise BatchError(f"cannot reach Redis: {exc}") from None


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
                writer: CacheWriter | None = None, metrics: BatchMetrics | None = None) -> BatchResult:
    """``fraudscore nightly``: rebuild the cache from the feature window's events as of ``as_of``."""
    from scoring_service.batch.pipeline import run_batch

    events = event_source(settings, job="nightly", group_id=group_id, workers=workers, source=source)
    adapters = batch_adapters(settings, events, redis_url=redis_url, writer=writer)
    return run_batch(adapters, job="nightly", as_of=as_of, show_progress=show_progress, metrics=metrics)


def batch_metrics(settings: Settings, job: str) -> MetricsExporter | nullcontext[BatchMetrics]:
    """``with batch_metrics(settings, job) as m:`` the run's metrics, served on ``batch_metrics_port`` (if set)
    while the block runs and until one scrape after it (docs/observability.md); BatchError if it cannot listen."""
    from contextlib import nullcontext

    from scoring_service.batch.metrics import BatchMetrics, MetricsExporter, MetricsPortError
    from scoring_service.batch.pipeline import BatchError

    metrics = BatchMetrics(job)
    if not settings.batch_metrics_port:
        return nullcontext(metrics)
    try:
        return MetricsExporter(metrics, settings.batch_metrics_port, settings.batch_metrics_addr,
                               settings.batch_metrics_linger_s)
    except MetricsPortError as exc:
        raise BatchError(f"--metrics-port / FRAUDSCORE_BATCH_METRICS_PORT: {exc}") from None


def replay_cache(settings: Settings, frm: str | None, to: str | None, *, group_id: str | None = None,
                 workers: int = 1, source: str | Path | None = None, redis_url: str | None = None,
                 show_progress: bool | None = None, metrics: BatchMetrics | None = None) -> BatchResult:
    """``fraudscore replay``: rebuild the cache as of ``to`` from the events in [``frm``, ``to``)."""
    from scoring_service.batch import replay

    events = event_source(settings, job="replay", group_id=group_id, workers=workers, source=source)
    replay.check_bounds(events, frm, to)  # bad bounds fail before Redis, the database and the model are touched
    return replay.replay_cache(batch_adapters(settings, events, redis_url=redis_url), frm, to, show_progress=show_progress,
                               metrics=metrics)


def replay_through_service(settings: Settings, address: str, frm: str | None, to: str | None, *, speed: float = 0.0,
                           concurrency: int = 32, source: str | Path | None = None, limit: int | None = None,
                           timeout_s: float = 2.0, show_progress: bool | None = None,
                           tls: dict[str, Any] | None = None, api_key: str | None = None) -> dict[str, Any]:
    """``fraudscore replay --through-service``: the window's payments as Score() calls; the served metrics.
    ``tls``: ``tls_ca``/``tls_cert``/``tls_key``/``tls_server_name`` of ``fraudscore_client.ChannelConfig``."""
    from fraudscore_client import ChannelConfig, open_aio_channel
    from scoring_service.batch import replay

    config = ChannelConfig(address, api_key=api_key, **{k: v for k, v in (tls or {}).items() if v is not None})

    events = event_source(settings, job="replay", group_id="fraudscore-replay-service", source=source)
    active = registry(settings).active()  # its training profile: the drift per day (docs/observability.md)
    return replay.replay_through_service(events, address, frm, to, speed=speed, concurrency=concurrency, limit=limit,
                                         timeout_s=timeout_s, show_progress=show_progress,
                                         drift_reference=active.params.get("drift_profile") if active else None,
                                         open_channel=lambda _address: open_aio_channel(config), metadata=config.metadata())


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
