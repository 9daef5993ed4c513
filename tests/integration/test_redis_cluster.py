"""The cache adapter and the batch writer on a real 3-node Redis Cluster (one cluster for the module):
reads spread over nodes, the writer's generation switch, MOVED and ASK after a slot migration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from scoring_service.adapters.redis import cluster_writer
from scoring_service.adapters.redis.cache_writer import CacheWriteError, RedisCacheWriter, entry_items
from scoring_service.adapters.redis.cluster import ClusterRedis, key_slot
from scoring_service.adapters.redis.entity_cache import CUSTOMER, TERMINAL, CacheEntry, CircuitBreaker, EntityCache
from scoring_service.core.cache_layout import ONLINE_GENERATION, active_generation_key, entity_key, intraday_key
from scoring_service.core.integrity import MacKeys
from tests.servers.redis import TEST_CACHE_MAC_KEYS
from tests.servers.redis_cluster import RedisCluster

MAC = MacKeys.parse(TEST_CACHE_MAC_KEYS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster().start()
    yield c
    c.stop()


def _entry(score: float, version: str, generation: str = ONLINE_GENERATION) -> CacheEntry:
    return CacheEntry(risk_score=score, state={"n": 1.0}, model_version=version, computed_at=time.time(),
                      generation=generation)


def _cache(url: str) -> EntityCache:
    return EntityCache(url, timeout_s=1.0, ttl_s=600, breaker=CircuitBreaker(5, 1.0), mac=MAC, cluster=True)


def _on_other_nodes(cluster: RedisCluster, version: str, gen: str, prefix: str) -> tuple[str, str]:
    """A card and a terminal id whose entries (under ``gen``) lie on two different nodes."""
    c_port = cluster.owner_port(key_slot(entity_key(version, gen, CUSTOMER, f"{prefix}-c")))
    for i in range(100):
        t = f"{prefix}-t{i}"
        if cluster.owner_port(key_slot(entity_key(version, gen, TERMINAL, t))) != c_port:
            return f"{prefix}-c", t
    raise AssertionError("no terminal on another node")


def _write_generation(url: str, version: str, gen: str, customers: dict[str, float], terminals: dict[str, float]) -> None:
    items = entry_items(version, gen, {c: _entry(s, version, gen) for c, s in customers.items()},
                        {t: _entry(s, version, gen) for t, s in terminals.items()})
    stats = RedisCacheWriter(url, ttl_s=600, mac=MAC, cluster=True).write_items(items)
    assert stats.keys == len(items)


def test_key_slot_matches_redis_for_plain_and_tagged_keys(cluster: RedisCluster) -> None:
    node = cluster.client(cluster.ports[0])
    for key in ("fs:1:m:g:c:42", "fs:1:intraday:c:card-1", "a{tag}b", "{}x", "x{}{y}", "é{t:1}"):
        assert key_slot(key) == node.execute_command("CLUSTER", "KEYSLOT", key)


def test_a_payment_s_entities_and_intraday_are_read_across_nodes_in_one_call(cluster: RedisCluster) -> None:
    version = "cl-read"
    customer, terminal = _on_other_nodes(cluster, version, ONLINE_GENERATION, "read")

    async def run() -> tuple[CacheEntry | None, CacheEntry | None, list[str], int]:
        cache = _cache(cluster.url)
        cache.write_back(version, [(CUSTOMER, customer, _entry(0.31, version)), (TERMINAL, terminal, _entry(0.62, version))])
        cache.record_payment(customer, time.time() - 5, 12.5, "tx-1")
        cache.record_payment(customer, time.time(), 7.0, "tx-2")
        await cache.drain()
        got = await cache.read(version, customer, terminal, 1.0)
        nodes = len(cache._client._nodes) if isinstance(cache._client, ClusterRedis) else 0
        await cache.close()
        return got.customer, got.terminal, [p.transaction_id for p in got.intraday], nodes

    c, t, intraday, nodes = asyncio.run(run())
    assert c is not None and t is not None and (c.risk_score, t.risk_score) == (0.31, 0.62)
    assert intraday == ["tx-1", "tx-2"]
    assert nodes >= 2  # the entries really came from two nodes
    # Written where the cluster says they live (not only readable through our own routing).
    key = entity_key(version, ONLINE_GENERATION, CUSTOMER, customer)
    assert cluster.client(cluster.owner_port(key_slot(key))).exists(key) == 1
    ikey = intraday_key(customer)
    assert cluster.client(cluster.owner_port(key_slot(ikey))).zcard(ikey) == 2


def test_the_writer_s_generation_switch_old_until_the_switch_new_after(cluster: RedisCluster) -> None:
    version = "cl-switch"
    customer, terminal = _on_other_nodes(cluster, version, "g1", "sw")
    _write_generation(cluster.url, version, "g1", {customer: 0.1}, {terminal: 0.2})
    writer = RedisCacheWriter(cluster.url, ttl_s=600, mac=MAC, cluster=True)
    g1_sample = [entity_key(version, "g1", CUSTOMER, customer).encode()]
    assert writer.switch_generation(version, "g1", g1_sample) is None

    async def read() -> tuple[float | None, float | None, str]:
        cache = _cache(cluster.url)
        gen = await cache.refresh_generation(version)
        got = await cache.read(version, customer, terminal, 1.0)
        await cache.close()
        return (got.customer.risk_score if got.customer else None,
                got.terminal.risk_score if got.terminal else None, gen)

    assert asyncio.run(read()) == (0.1, 0.2, "g1")
    # g2 written (every node) but not switched: readers still see all of g1.
    _write_generation(cluster.url, version, "g2", {customer: 0.8}, {terminal: 0.9})
    assert asyncio.run(read()) == (0.1, 0.2, "g1")
    # A sample key of g3 that was never written: no switch.
    with pytest.raises(CacheWriteError, match="sampled keys"):
        writer.switch_generation(version, "g3", [entity_key(version, "g3", CUSTOMER, customer).encode()])
    assert cluster_writer.active_generation(cluster.url, version) == "g1"
    assert writer.switch_generation(version, "g2", [entity_key(version, "g2", TERMINAL, terminal).encode()]) == "g1"
    assert asyncio.run(read()) == (0.8, 0.9, "g2")
    # The superseded generation is removed from every node (its two entries and its manifest); the pointer stays.
    assert cluster_writer.delete_generation(cluster.url, version, "g1") == 3
    assert cluster.client(cluster.owner_port(key_slot(active_generation_key(version)))).get(
        active_generation_key(version)) == b"g2"


def test_moved_and_ask_after_a_slot_migration_are_followed(cluster: RedisCluster) -> None:
    version = "cl-moved"
    customer, terminal = _on_other_nodes(cluster, version, ONLINE_GENERATION, "mv")
    key = entity_key(version, ONLINE_GENERATION, CUSTOMER, customer)
    slot = key_slot(key)

    async def run() -> tuple[list[float | None], list[dict[str, int]], int]:
        cache = _cache(cluster.url)
        client = cache._client
        assert isinstance(client, ClusterRedis)
        cache.write_back(version, [(CUSTOMER, customer, _entry(0.44, version)), (TERMINAL, terminal, _entry(0.55, version))])
        await cache.drain()
        scores = [(await cache.read(version, customer, terminal, 1.0)).customer]
        seen = [dict(client.redirects)]
        loads = client.refreshes
        # The card's slot moves to another node while the client holds the old slot map: MOVED.
        target = next(p for p in cluster.ports if p != cluster.owner_port(slot))
        await asyncio.to_thread(cluster.move_slot, slot, target)
        scores.append((await cache.read(version, customer, terminal, 1.0)).customer)
        seen.append(dict(client.redirects))
        # Half-way through the next migration (keys moved, slot still MIGRATING on the source): ASK.
        back = next(p for p in cluster.ports if p != target)
        await asyncio.to_thread(cluster.move_slot, slot, back, finish=False)
        scores.append((await cache.read(version, customer, terminal, 1.0)).customer)
        seen.append(dict(client.redirects))
        for port in cluster.ports:  # finish it
            await asyncio.to_thread(cluster.client(port).execute_command, "CLUSTER", "SETSLOT", slot, "NODE",
                                    cluster.node_id(back))
        await asyncio.to_thread(cluster.wait_ok, 15)
        scores.append((await cache.read(version, customer, terminal, 1.0)).customer)
        reloaded = client.refreshes - loads
        await cache.close()
        return [s.risk_score if s else None for s in scores], seen, reloaded

    scores, seen, reloaded = asyncio.run(run())
    assert scores == [0.44, 0.44, 0.44, 0.44]
    assert seen[0] == {"MOVED": 0, "ASK": 0}
    assert seen[1]["MOVED"] == 1 and seen[1]["ASK"] == 0  # followed the MOVED ...
    assert seen[2]["ASK"] == 1  # ... and the ASK of a slot half-way through its migration
    assert reloaded >= 1  # the MOVED made the client reload its slot map


def test_the_writer_follows_a_slot_migrating_under_it(cluster: RedisCluster) -> None:
    version = "cl-write-ask"
    customers = {f"w{i}": i / 100 for i in range(30)}  # every node
    moving = entity_key(version, "g1", CUSTOMER, "w0")
    slot = key_slot(moving)
    target = next(p for p in cluster.ports if p != cluster.owner_port(slot))
    cluster.move_slot(slot, target, finish=False)  # MIGRATING: a new key of that slot is ASKed to the target
    try:
        _write_generation(cluster.url, version, "g1", customers, {})
    finally:
        for port in cluster.ports:
            cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
        cluster.wait_ok(15)
    assert cluster.client(target).exists(moving) == 1

    async def read() -> list[float | None]:
        cache = _cache(cluster.url)
        assert await cache.refresh_generation(version) == "g1"
        got = [(await cache.read(version, c, "none", 1.0, intraday=False)).customer for c in customers]
        await cache.close()
        return [e.risk_score if e else None for e in got]

    writer = RedisCacheWriter(cluster.url, ttl_s=600, mac=MAC, cluster=True)
    assert writer.switch_generation(version, "g1", [moving.encode()]) is None
    assert asyncio.run(read()) == list(customers.values())


def test_scripts_are_routed_by_their_first_key_and_keyless_commands_are_refused(cluster: RedisCluster) -> None:
    keys = [f"fs:rl:{i}" for i in range(12)]  # on every node

    async def run() -> list[bytes]:
        client = ClusterRedis(cluster.url)
        await client.ping(2.0)  # every primary
        assert len(client._nodes) == 3
        await client.execute_many([("SET", k, k) for k in keys])
        got = await client.execute_many([("EVAL", "return redis.call('GET', KEYS[1])", 1, k) for k in keys])
        with pytest.raises(ValueError, match="needs a key"):
            await client.execute("PING")
        await client.aclose()
        return got

    assert asyncio.run(run()) == [k.encode() for k in keys]
    assert len({cluster.owner_port(key_slot(k)) for k in keys}) == 3


def test_misconfigurations_are_refused_with_a_clear_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scoring_service.bootstrap import embedded_redis
    from scoring_service.config import Settings

    with pytest.raises(ValueError, match="only database 0"):
        ClusterRedis("redis://127.0.0.1:7000/3")
    with pytest.raises(SystemExit, match="FRAUDSCORE_REDIS_CLUSTER=true needs REDIS_URL"):
        embedded_redis(Settings(data_dir=tmp_path, redis_url=None, redis_cluster=True))


def test_rate_limit_buckets_live_on_the_cluster_node_that_owns_them(cluster: RedisCluster) -> None:
    """Each key's token bucket is one shared bucket on its slot's node (EVALSHA routed by its key),
    not a per-process fallback: two limiters (two workers) draw from the same bucket."""
    from scoring_service.adapters.redis.rate_limit import RateLimiter

    async def run() -> tuple[list[list[bool]], set[bool], set[tuple[str, int]]]:
        a, b = RateLimiter(cluster.url, cluster=True, timeout_s=1.0), RateLimiter(cluster.url, cluster=True, timeout_s=1.0)
        allowed, shared = [], set()
        for key_id in range(101, 107):  # six keys (not the fs:rl:0-11 strings of the EVAL test): spread over the nodes
            row = []
            for i in range(6):  # burst 4, a negligible refill: 4 allowed in all, across both limiters
                verdict = await (a if i % 2 else b).take(key_id, 0.001, 4)
                row.append(verdict.allowed)
                shared.add(verdict.shared)
            allowed.append(row)
        owners = {a._redis.owner(f"fs:rl:{k}") for k in range(101, 107)}  # type: ignore[union-attr]
        await a.close()
        await b.close()
        return allowed, shared, owners

    allowed, shared, owners = asyncio.run(run())
    assert shared == {True}
    assert all(row == [True] * 4 + [False] * 2 for row in allowed), allowed
    assert len(owners) >= 2


def test_read_many_across_nodes_gives_what_read_gives_for_each(cluster: RedisCluster) -> None:
    version = "cl-read-many"
    customer, terminal = _on_other_nodes(cluster, version, ONLINE_GENERATION, "many")

    async def run() -> tuple[list, list]:
        cache = _cache(cluster.url)
        cache.write_back(version, [(CUSTOMER, customer, _entry(0.41, version)), (TERMINAL, terminal, _entry(0.52, version))])
        cache.record_payment(customer, time.time(), 3.0, "tx-m")
        await cache.drain()
        pairs = [(customer, terminal), ("nobody", terminal), (customer, "no-terminal")]
        many = await cache.read_many(version, pairs, 1.0)
        one_by_one = [await cache.read(version, c, t, 1.0) for c, t in pairs]
        await cache.close()
        return many, one_by_one

    many, one_by_one = asyncio.run(run())
    assert many == one_by_one
    assert [(r.customer is not None, r.terminal is not None) for r in many] == [(True, True), (False, True), (True, False)]
    assert [p.transaction_id for p in many[0].intraday] == ["tx-m"]
