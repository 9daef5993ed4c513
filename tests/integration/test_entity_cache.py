"""EntityCache against a real redis-server: one round trip per read, coalesced NX write-backs, intraday payments."""

from __future__ import annotations

import asyncio
import time

import redis

from scoring_service.adapters.redis.entity_cache import CUSTOMER, TERMINAL, CacheEntry, CacheRead, CircuitBreaker, EntityCache
from scoring_service.core.cache_layout import (
    INTRADAY_HORIZON_S,
    INTRADAY_MAX_PAYMENTS,
    ONLINE_GENERATION,
    entity_key,
    intraday_key,
)
from scoring_service.core.features.intraday import IntradayPayment
from scoring_service.core.integrity import MacKeys
from tests.servers.redis import TEST_CACHE_MAC_KEYS, sealed_item

VERSION = "xgb-test-cache"


def _entry(score: float) -> CacheEntry:
    return CacheEntry(risk_score=score, state={"n": 1.0}, model_version=VERSION, computed_at=time.time(),
                      reasons=[("AMOUNT_HIGH", "amount", 0.5)])


def _cache(url: str) -> EntityCache:
    return EntityCache(url, timeout_s=0.5, ttl_s=600, breaker=CircuitBreaker(5, 1.0),
                       mac=MacKeys.parse(TEST_CACHE_MAC_KEYS))


def test_write_backs_of_one_loop_turn_go_out_together_and_never_overwrite(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    kept = entity_key(VERSION, ONLINE_GENERATION, CUSTOMER, "c-kept")
    sync.set(*sealed_item(kept, _entry(0.9)))  # as a batch run writes it

    async def run() -> tuple[int, list[CacheEntry | None]]:
        cache = _cache(redis_url)
        for i in range(50):
            cache.write_back(VERSION, [(CUSTOMER, f"c-{i}", _entry(i / 100))])
        cache.write_back(VERSION, [(CUSTOMER, "c-kept", _entry(0.1))])
        flushes = len(cache._pending_writes)
        await cache.drain()
        reads = [await cache.read(VERSION, f"c-{i}", "t-none", 0.5) for i in range(50)]
        kept_read = await cache.read(VERSION, "c-kept", "t-none", 0.5)
        assert (kept_read.customer, kept_read.terminal) == (CacheEntry.decode(sync.get(kept)), None)
        await cache.close()
        return flushes, [r.customer for r in reads]

    flushes, customers = asyncio.run(run())
    assert flushes == 1
    assert [round(c.risk_score, 2) if c else None for c in customers] == [i / 100 for i in range(50)]
    assert CacheEntry.decode(sync.get(kept)).risk_score == 0.9  # NX: the batch's entry stays
    assert 0 < sync.ttl(entity_key(VERSION, ONLINE_GENERATION, CUSTOMER, "c-7")) <= 600


def test_write_backs_after_a_flush_started_are_not_lost(redis_url: str) -> None:
    async def run() -> list[tuple[CacheEntry | None, CacheEntry | None]]:
        cache = _cache(redis_url)
        cache.write_back(VERSION, [(CUSTOMER, "late-0", _entry(0.2))])
        await asyncio.sleep(0)  # the first flush starts
        cache.write_back(VERSION, [(CUSTOMER, "late-1", _entry(0.3)), (TERMINAL, "late-t", _entry(0.4))])
        await cache.drain()
        reads = [await cache.read(VERSION, "late-0", "x", 0.5), await cache.read(VERSION, "late-1", "late-t", 0.5)]
        await cache.close()
        return [(r.customer, r.terminal) for r in reads]

    (c0, _), (c1, t1) = asyncio.run(run())
    assert c0 is not None and c0.risk_score == 0.2
    assert c1 is not None and c1.risk_score == 0.3
    assert t1 is not None and t1.risk_score == 0.4


def test_intraday_payments_are_read_in_the_same_round_trip_once_per_transaction_and_trimmed(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    now = time.time()

    async def run() -> tuple[list[IntradayPayment], list[IntradayPayment]]:
        cache = _cache(redis_url)
        cache.record_payment("card-i", now - INTRADAY_HORIZON_S - 10, 9.0, "too-old")
        await cache.drain()
        for i, (tx, amount) in enumerate([("a", 1.5), ("b", 2.25), ("a", 1.5), ("c|with|bars", 0.0)]):
            cache.record_payment("card-i", now + i, amount, tx)  # "a" twice: a retried transaction
        await cache.drain()
        first = (await cache.read(VERSION, "card-i", "t-none", 0.5)).intraday
        for i in range(INTRADAY_MAX_PAYMENTS + 5):
            cache.record_payment("card-many", now + i / 1000, 1.0, f"m{i}")
        await cache.drain()
        many = (await cache.read(VERSION, "card-many", "t-none", 0.5)).intraday
        await cache.close()
        return first, many

    first, many = asyncio.run(run())
    assert first == [IntradayPayment(now, 1.5, "a"), IntradayPayment(now + 1, 2.25, "b"),
                     IntradayPayment(now + 3, 0.0, "c|with|bars")]  # the old one trimmed, the retry once
    assert 0 < sync.ttl(intraday_key("card-i")) <= INTRADAY_HORIZON_S
    assert len(many) == INTRADAY_MAX_PAYMENTS and many[0].transaction_id == "m5"  # the newest kept


def test_the_list_is_trimmed_only_when_the_read_saw_something_to_trim(redis_url: str) -> None:
    now = time.time()
    old, fresh = IntradayPayment(now - INTRADAY_HORIZON_S - 1, 1.0, "old"), IntradayPayment(now - 5, 1.0, "fresh")
    assert CacheRead(None, None, [old, fresh]).needs_trim(now)
    assert not CacheRead(None, None, [fresh]).needs_trim(now) and not CacheRead(None, None, []).needs_trim(now)
    assert CacheRead(None, None, [fresh] * INTRADAY_MAX_PAYMENTS).needs_trim(now)

    async def run() -> list[str]:
        cache = _cache(redis_url)
        cache.record_payment("card-t", old.timestamp, 1.0, "old")
        cache.record_payment("card-t", now, 2.0, "new", trim=False)  # nothing to trim, as far as the reader knew
        await cache.drain()
        kept = [p.transaction_id for p in (await cache.read(VERSION, "card-t", "t-none", 0.5)).intraday]
        cache.record_payment("card-t", now + 1, 3.0, "newer", trim=True)
        await cache.drain()
        kept += [p.transaction_id for p in (await cache.read(VERSION, "card-t", "t-none", 0.5)).intraday]
        await cache.close()
        return kept

    assert asyncio.run(run()) == ["old", "new", "new", "newer"]


def test_read_many_reads_every_payment_in_one_round_trip_as_read_does_one(redis_url: str) -> None:
    async def run() -> tuple[list[CacheRead], list[CacheRead], int]:
        cache = _cache(redis_url)
        cache.write_back(VERSION, [(CUSTOMER, f"rm-c{i}", _entry(i / 10)) for i in range(0, 6, 2)]
                         + [(TERMINAL, "rm-t1", _entry(0.77))])
        cache.record_payment("rm-c1", time.time() - 3, 5.0, "rm-tx-1")
        await cache.drain()
        pairs = [(f"rm-c{i}", "rm-t1" if i % 3 == 0 else "rm-t-none") for i in range(6)]
        calls = []
        execute_many = cache._client.execute_many

        async def counted(commands, timeout_s=None):
            calls.append(len(commands))
            return await execute_many(commands, timeout_s)

        cache._client.execute_many = counted  # type: ignore[method-assign]
        many = await cache.read_many(VERSION, pairs, 0.5)
        one_by_one = [await cache.read(VERSION, c, t, 0.5) for c, t in pairs]
        sent = len(calls)
        await cache.close()
        return many, one_by_one, sent

    many, one_by_one, round_trips = asyncio.run(run())
    assert round_trips == 1 + 6  # read_many: one pipeline for the six; read: one each
    assert many == one_by_one  # the same reads, in the order asked
    assert [round(r.customer.risk_score, 1) if r.customer else None for r in many] == [0.0, None, 0.2, None, 0.4, None]
    assert [r.terminal.risk_score if r.terminal else None for r in many] == [0.77, None, None, 0.77, None, None]
    assert [p.transaction_id for p in many[1].intraday] == ["rm-tx-1"]


def test_write_backs_go_to_the_online_generation_and_serve_only_cards_the_batch_does_not_know(redis_url: str) -> None:
    """The scorer writes generation "0" only (its Redis user may write nothing else); under a batch
    generation the same MGET reads a card's online entry, used for a card the manifest does not name
    and never in place of a known card's missing batch entry."""
    from scoring_service.adapters.redis.cache_writer import RedisCacheWriter, entry_items
    from scoring_service.batch.pipeline import new_generation

    version = f"{VERSION}-online"
    mac = MacKeys.parse(TEST_CACHE_MAC_KEYS)
    generation = new_generation(time.time(), 7)
    writer = RedisCacheWriter(redis_url, ttl_s=600, connections=1, mac=mac)
    items = entry_items(version, generation, {"c-known": _entry(0.97)}, {"t-1": _entry(0.1)})
    writer.write_items(items)
    writer.switch_generation(version, generation, [items[0][0]])
    r = redis.Redis.from_url(redis_url)

    async def run() -> tuple[CacheRead, CacheRead, CacheRead]:
        cache = _cache(redis_url)
        try:
            assert await cache.refresh_generation(version) == generation
            for card, score in (("c-new", 0.02), ("c-known", 0.01)):  # c-known's: as a forger with the MAC key would
                cache.write_back(version, [(CUSTOMER, card, _entry(score))])
            await cache.drain()
            new = await cache.read(version, "c-new", "t-1", 0.5)
            known = await cache.read(version, "c-known", "t-1", 0.5)
            r.delete(entity_key(version, generation, CUSTOMER, "c-known"))  # the batch entry gone (DEL, eviction)
            lost = await cache.read(version, "c-known", "t-1", 0.5)
            return new, known, lost
        finally:
            await cache.close()

    new, known, lost = asyncio.run(run())
    assert r.exists(entity_key(version, ONLINE_GENERATION, CUSTOMER, "c-new"))
    assert not r.exists(entity_key(version, generation, CUSTOMER, "c-new"))  # never under the batch generation
    assert new.customer is not None and new.customer.risk_score == 0.02 and new.generation == generation
    assert known.customer is not None and known.customer.risk_score == 0.97  # the batch entry wins
    assert lost.customer is None and not lost.customer_rejected  # the online entry does not stand in for it
