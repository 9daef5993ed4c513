"""The online service's Redis adapter: one round trip per request, short timeouts, a circuit breaker.

A request reads both entities' entries and the card's intraday payments in one pipeline (``MGET``
+ ``ZRANGE``). The active generation of the serving model version is cached in-process and
refreshed in the background (``refresh_generation``). Write-backs of freshly scored entities and
the intraday record of every scored payment are fire-and-forget: they never hold up an answer, and
all those of one event-loop turn go out in one pipeline.

Entries are sealed with the MAC keys (``core.cache_layout.seal``) on write-back and checked on
read: one that does not verify (forged, altered, unsealed, signed by an unknown key) is read as
unseen, counted (``fraudscore_cache_mac_rejected_total``) and logged at most every
``_REJECT_LOG_EVERY_S``; the write-back of a card whose entry was rejected replaces it (no NX).

``cluster=True``: the same keys on a Redis Cluster (``cluster.ClusterRedis``, docs/redis-cluster.md).
A payment's entries and the card's intraday set lie in different slots, so the read is ``GET`` +
``GET`` + ``ZRANGE`` instead of ``MGET`` + ``ZRANGE``, sent as one pipeline per node, concurrently:
still one round trip of wall time.

The scorer writes only the online generation "0" (a card no batch run knows, after its first
payment); under a batch generation a read also fetches the card's online entry in the same
``MGET`` and uses it only for a card that generation's manifest does not name.

Each batch generation's sealed manifest (``core.known_entities``) is read and verified when the
scorer switches to it (``refresh_generation``); ``knows`` answers whether a batch run wrote an
entity, so a missing or rejected entry of a known entity is never read as a new card.

Length: over 350 lines because the read, the write-back and the generation/manifest they both
depend on share one connection and one breaker; splitting them would split that state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from scoring_service.adapters.redis.cluster import ClusterRedis
from scoring_service.adapters.redis.protocol import Arg
from scoring_service.adapters.redis.resp import PipelinedRedis, RedisReplyError
from scoring_service.core.cache_layout import (
    CUSTOMER,
    INTRADAY_HORIZON_S,
    INTRADAY_MAX_PAYMENTS,
    ONLINE_GENERATION,
    TERMINAL,
    CacheEntry,
    EntityKind,
    active_generation_key,
    entity_key,
    intraday_key,
    intraday_member,
    manifest_key,
    open_sealed,
    parse_intraday_member,
    seal,
)
from scoring_service.core.features.intraday import IntradayPayment
from scoring_service.core.integrity import MacKeys
from scoring_service.core.known_entities import KnownEntities
from scoring_service.logging import get_logger

RedisError = (RedisReplyError, OSError, TimeoutError)  # ConnectionError is an OSError

log = get_logger(__name__)

MAC_REJECTED = Counter("fraudscore_cache_mac_rejected_total",
                       "Cache entries read as unseen because their MAC did not verify (forged, altered, unsealed).",
                       ["kind"])
_REJECT_LOG_EVERY_S = 10.0
_REJECTED_KEYS_KEPT = 10_000
_MANIFEST_TIMEOUT_S = 10.0  # a manifest is 8 bytes an entity: tens of MB at tens of millions
MANIFEST_STATE = Counter("fraudscore_cache_manifest_total",
                         "Generation manifests read at a switch, by result (loaded, missing, rejected).", ["result"])


class CircuitBreaker:
    """Opens after ``failures`` consecutive errors; after ``reset_s`` lets one trial call through."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures_to_open = failures
        self.reset_s = reset_s
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at >= self.reset_s and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        if self.opened_at is not None:
            log.info("redis.breaker_closed")
        self.consecutive_failures = 0
        self.opened_at = None
        self._trial_in_flight = False

    def failure(self) -> None:
        self.consecutive_failures += 1
        self._trial_in_flight = False
        if self.opened_at is not None:
            self.opened_at = time.monotonic()  # trial failed: stay open another period
        elif self.consecutive_failures >= self.failures_to_open:
            self.opened_at = time.monotonic()
            log.warning("redis.breaker_open", failures=self.consecutive_failures)


@dataclass(frozen=True, slots=True)
class CacheRead:
    """What one request reads: the customer's and terminal's entries (None: not cached) and the card's intraday payments."""

    customer: CacheEntry | None
    terminal: CacheEntry | None
    intraday: list[IntradayPayment]
    customer_rejected: bool = False  # an entry was there but its seal did not verify
    terminal_rejected: bool = False
    generation: str = ONLINE_GENERATION  # the batch generation read ("0": none yet)

    def needs_trim(self, now: float, max_payments: int = INTRADAY_MAX_PAYMENTS, horizon_s: float = INTRADAY_HORIZON_S) -> bool:
        """The card's list holds payments past the horizon, or as many as are kept (oldest first)."""
        return len(self.intraday) >= max_payments or (
            bool(self.intraday) and self.intraday[0].timestamp < now - horizon_s)


def _intraday_payments(reply: list[bytes]) -> list[IntradayPayment]:
    """ZRANGE ... WITHSCORES (member, score, member, score, ...) -> payments, oldest first."""
    out = []
    for i in range(0, len(reply) - 1, 2):
        amount, transaction_id = parse_intraday_member(reply[i])
        out.append(IntradayPayment(float(reply[i + 1]), amount, transaction_id))
    return out


class CacheUnavailable(Exception):
    """The cache could not be read in time (timeout, connection error, or breaker open)."""


class EntityCache:
    def __init__(self, url: str, *, timeout_s: float, ttl_s: int, breaker: CircuitBreaker, mac: MacKeys,
                 cluster: bool = False, intraday_ttl_s: int = INTRADAY_HORIZON_S,
                 intraday_max_payments: int = INTRADAY_MAX_PAYMENTS) -> None:
        # One pipelined connection for every request of this process (scoring_service/adapters/redis/resp.py),
        # or one per node of a Redis Cluster (cluster.py).
        options = {"connect_timeout_s": max(timeout_s, 0.5), "stale_after_s": max(1.0, 20 * timeout_s)}
        self.cluster = cluster
        self._client: PipelinedRedis | ClusterRedis = (ClusterRedis(url, **options) if cluster
                                                       else PipelinedRedis(url, **options))
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.intraday_ttl_s = intraday_ttl_s  # a card's intraday list: kept this long after its last payment,
        self.intraday_max_payments = intraday_max_payments  # and at most this many (the newest)
        self.breaker = breaker
        self._generations: dict[str, str] = {}
        self._pending_writes: set[asyncio.Task[None]] = set()
        self._queued: list[tuple[str, CacheEntry]] = []
        self._queued_payments: list[tuple[str, float, float, str, bool]] = []
        self._flush_scheduled = False
        self.mac = mac
        # model version -> (generation, the entities its batch run wrote): the last manifest that verified
        self._known: dict[str, tuple[str, KnownEntities]] = {}
        self._manifest_failed: dict[str, str] = {}  # model version -> the generation whose manifest was missing/rejected
        self._rejected_keys: set[str] = set()  # customer keys whose entry did not verify: overwrite them
        self._rejects_unlogged = 0
        self._reject_logged_at = -_REJECT_LOG_EVERY_S

    def _open(self, key: str, kind: EntityKind, raw: bytes | None) -> CacheEntry | None:
        """The entry stored under ``key`` if its seal verifies; else None (counted, logged now and then)."""
        if raw is None:
            return None
        payload = open_sealed(self.mac, key, raw)
        if payload is not None:
            return CacheEntry.decode(payload)
        MAC_REJECTED.labels(kind).inc()
        if kind == CUSTOMER and len(self._rejected_keys) < _REJECTED_KEYS_KEPT:
            self._rejected_keys.add(key)
        self._rejects_unlogged += 1
        now = time.monotonic()
        if now - self._reject_logged_at >= _REJECT_LOG_EVERY_S:
            log.warning("cache.mac_rejected", entries=self._rejects_unlogged, kind=kind,
                        note="entry not sealed by a configured key: read as unseen")
            self._reject_logged_at, self._rejects_unlogged = now, 0
        return None

    def generation(self, model_version: str) -> str:
        return self._generations.get(model_version, ONLINE_GENERATION)

    def needs_trim(self, read: CacheRead, now: float) -> bool:
        return read.needs_trim(now, self.intraday_max_payments, self.intraday_ttl_s)

    def knows(self, model_version: str, kind: EntityKind, entity_id: str, generation: str | None = None) -> bool:
        """Whether a batch run wrote an entry for this entity (``core.known_entities``).

        With a manifest verified in this process: what it says, whatever the pointer says now (a
        pointer deleted, or a Redis restarted empty, does not make the batch's cards new). Without
        one: before any batch generation (the online one), no; under a batch generation whose
        manifest never verified here (deleted, forged, or written by a nightly of an older
        release), every entity may be known, so yes (fail closed; ``cache.manifest_missing``)."""
        known = self._known.get(model_version)
        if known is not None:
            return known[1].contains(kind, entity_id)
        return (self.generation(model_version) if generation is None else generation) != ONLINE_GENERATION

    async def _load_manifest(self, model_version: str, generation: str) -> None:
        """Read and verify ``generation``'s manifest; keep the previous one unless it verifies."""
        key = manifest_key(model_version, generation)
        try:
            raw = await self._client.execute("GET", key, timeout_s=_MANIFEST_TIMEOUT_S)
        except RedisError as exc:
            log.warning("cache.manifest_unreadable", model_version=model_version, generation=generation,
                        error=type(exc).__name__)
            return
        payload = open_sealed(self.mac, key, raw) if raw else None
        try:
            known = KnownEntities.decode(payload) if payload is not None else None
        except ValueError:
            known = None
        if known is None:
            self._manifest_failed[model_version] = generation  # said once per generation, not at every poll
            result = "missing" if raw is None else "rejected"
            MANIFEST_STATE.labels(result).inc()
            previous = self._known.get(model_version)
            log.error("cache.manifest_" + result, model_version=model_version, generation=generation,
                      kept=previous[0] if previous else None,
                      note="entities the batch knew are judged by the last manifest that verified; none: every "
                           "cache miss is answered at least the degraded floor (run the nightly)")
            return
        MANIFEST_STATE.labels("loaded").inc()
        self._known[model_version] = (generation, known)
        log.info("cache.manifest_loaded", model_version=model_version, generation=generation, entities=len(known))

    async def refresh_generation(self, model_version: str) -> str:
        """Re-read which generation is active for ``model_version`` (one GET; breaker-guarded)."""
        if not self.breaker.allow():
            return self.generation(model_version)
        try:
            raw = await self._client.execute("GET", active_generation_key(model_version), timeout_s=self.timeout_s * 4)
        except RedisError as exc:
            self.breaker.failure()
            log.debug("redis.generation_refresh_failed", error=str(exc))
            return self.generation(model_version)
        self.breaker.success()
        gen = raw.decode() if raw else ONLINE_GENERATION
        if self._generations.get(model_version) != gen:
            log.info("cache.generation", model_version=model_version, generation=gen)
        known = self._known.get(model_version)
        if (gen != ONLINE_GENERATION and (known is None or known[0] != gen)
                and self._manifest_failed.get(model_version) != gen):
            await self._load_manifest(model_version, gen)  # before the switch: no miss is judged without it
        self._generations[model_version] = gen
        return gen

    async def read(
        self, model_version: str, customer_id: str, terminal_id: str, timeout_s: float, *, intraday: bool = True
    ) -> CacheRead:
        """Both entities' entries and (``intraday``) the card's intraday payments, in one round trip (one
        pipeline: MGET + ZRANGE); raises CacheUnavailable instead of waiting."""
        return (await self.read_many(model_version, [(customer_id, terminal_id)], timeout_s, intraday=intraday))[0]

    async def read_many(
        self, model_version: str, pairs: Sequence[tuple[str, str]], timeout_s: float, *, intraday: bool = True
    ) -> list[CacheRead]:
        """``read`` for several payments ((customer id, terminal id) each) in one round trip: a ScoreBatch
        reads all its items in one pipeline instead of one each."""
        if not self.breaker.allow():
            raise CacheUnavailable("circuit breaker open")
        gen = self.generation(model_version)
        # Under a batch generation, a card's online entry (generation "0", the only one the scorer
        # writes) is read too, for a card that batch run does not know.
        online = gen != ONLINE_GENERATION
        keys = [(entity_key(model_version, gen, CUSTOMER, customer_id), entity_key(model_version, gen, TERMINAL, terminal_id),
                 entity_key(model_version, ONLINE_GENERATION, CUSTOMER, customer_id) if online else None)
                for customer_id, terminal_id in pairs]
        # A cluster: the keys lie in different slots (MGET would be refused: CROSSSLOT).
        per_item = (2 + online if self.cluster else 1) + (1 if intraday else 0)
        commands: list[tuple[Arg, ...]] = []
        for (customer_key, terminal_key, online_key), (customer_id, _) in zip(keys, pairs, strict=True):
            entry_keys = (customer_key, terminal_key) if online_key is None else (customer_key, terminal_key, online_key)
            if self.cluster:
                commands += [("GET", key) for key in entry_keys]
            else:
                commands.append(("MGET", *entry_keys))
            if intraday:
                commands.append(("ZRANGE", intraday_key(customer_id), 0, -1, "WITHSCORES"))
        try:
            replies = await self._client.execute_many(commands, timeout_s=min(timeout_s, self.timeout_s))
            for reply in replies:
                if isinstance(reply, RedisReplyError):
                    raise reply
        except RedisError as exc:
            self.breaker.failure()
            raise CacheUnavailable(type(exc).__name__) from exc
        self.breaker.success()
        width = 2 + online
        reads = []
        for i, ((customer_key, terminal_key, online_key), (customer_id, _)) in enumerate(zip(keys, pairs, strict=True)):
            item = replies[i * per_item:(i + 1) * per_item]
            raws, rest = (item[:width], item[width:]) if self.cluster else (item[0], item[1:])
            raw_c, raw_t = raws[0], raws[1]
            customer, terminal = self._open(customer_key, CUSTOMER, raw_c), self._open(terminal_key, TERMINAL, raw_t)
            rejected = customer is None and raw_c is not None
            if customer is None and online_key is not None and not self.knows(model_version, CUSTOMER, customer_id, gen):
                # a card this batch run never saw: the write-back of its first payment, if any (a card the
                # batch knows is judged by the batch's entry alone: its absence is lost state, not a new card)
                customer = self._open(online_key, CUSTOMER, raws[2])
            reads.append(CacheRead(customer, terminal, _intraday_payments(rest[0]) if intraday else [],
                                   rejected, terminal is None and raw_t is not None, gen))
        return reads

    def write_back(self, model_version: str, entries: Sequence[tuple[EntityKind, str, CacheEntry]]) -> None:
        """Store freshly computed entries ((kind, id, entry)) in the background, under the online
        generation "0" whatever generation is active: the scorer never writes a batch generation's
        keys (its Redis user may not, deploy/redis/users.acl), and a batch entry always wins.

        Write-backs queued during one turn of the event loop go out together, in one pipeline
        (one task and one round trip for all the misses a busy loop answered at once)."""
        if not entries or self.breaker.state == "open":
            return
        self._queued.extend((entity_key(model_version, ONLINE_GENERATION, kind, entity_id), entry)
                            for kind, entity_id, entry in entries)
        self._schedule_flush()

    def record_payment(self, customer_id: str, timestamp: float, amount: float, transaction_id: str, *,
                       trim: bool = True) -> None:
        """Add a scored payment to its card's intraday list, in the background (same pipeline as the
        write-backs of this loop turn). A transaction already there (a retry) is not added again.
        ``trim``: also drop the payments past the horizon and beyond the most kept (the caller,
        who just read the list, knows when there are any: see :meth:`CacheRead.needs_trim`)."""
        if self.breaker.state == "open":
            return
        self._queued_payments.append((customer_id, timestamp, amount, transaction_id, trim))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush())
            self._pending_writes.add(task)
            task.add_done_callback(self._pending_writes.discard)

    async def _flush(self) -> None:
        self._flush_scheduled = False  # from here on, new writes schedule the next flush
        queued, self._queued = self._queued, []
        payments, self._queued_payments = self._queued_payments, []
        # NX: never overwrite an entry a batch run (or a concurrent request) wrote; one that did
        # not verify (forged) is replaced.
        commands: list[tuple[Arg, ...]] = []
        for key, entry in queued:
            value = seal(self.mac, key, entry.encode())
            if key in self._rejected_keys:
                self._rejected_keys.discard(key)
                commands.append(("SET", key, value, "EX", self.ttl_s))
            else:
                commands.append(("SET", key, value, "EX", self.ttl_s, "NX"))
        for customer_id, timestamp, amount, transaction_id, trim in payments:
            key = intraday_key(customer_id)
            commands.append(("ZADD", key, "NX", repr(timestamp), intraday_member(amount, transaction_id)))
            if trim:
                commands += [
                    ("ZREMRANGEBYSCORE", key, "-inf", f"({timestamp - self.intraday_ttl_s!r}"),
                    ("ZREMRANGEBYRANK", key, 0, -(self.intraday_max_payments + 1)),
                ]
            commands.append(("EXPIRE", key, self.intraday_ttl_s))
        if not commands:
            return
        try:
            replies = await self._client.execute_many(commands, timeout_s=self.timeout_s * 10)
            errors = [r for r in replies if isinstance(r, RedisReplyError)]
            if errors:
                raise errors[0]
        except RedisError as exc:
            self.breaker.failure()
            log.warning("cache.write_back_failed", error=type(exc).__name__, entries=len(queued), payments=len(payments))

    async def drain(self) -> None:
        while self._pending_writes:
            await asyncio.gather(*list(self._pending_writes), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self._client.aclose()


__all__ = ["CUSTOMER", "TERMINAL", "CacheEntry", "CacheRead", "CacheUnavailable", "CircuitBreaker", "EntityCache"]
