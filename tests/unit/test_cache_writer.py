"""Bulk generation writes and the atomic switch, against a real redis-server."""

from __future__ import annotations

import pytest
import redis

from scoring_service.adapters.redis import cache_writer as cw
from scoring_service.core.cache_layout import CacheEntry, active_generation_key, entity_key


def _entries(n: int, gen: str) -> dict[str, CacheEntry]:
    return {str(i): CacheEntry(risk_score=i / n, state={"nb_tx_1d": float(i)}, model_version="m1",
                               computed_at=1.0, reasons=[("AMOUNT", "amount", 0.5)], generation=gen) for i in range(n)}


def test_resp_encoding_matches_redis_py():
    from redis.connection import Connection

    items = [(b"k1", b"v\r\n1"), (b"k\xff", b"")]
    packed = b"".join(Connection().pack_commands([("SET", k, v, "EX", 60) for k, v in items]))
    assert cw.encode_set_chunk(items, 60) == packed


def test_write_then_switch(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    customers, terminals = _entries(12_000, "g1"), _entries(3, "g1")
    stats = cw.write_generation(redis_url, "m1", "g1", customers, terminals, ttl_s=600, chunk=1000, connections=3)
    assert stats.keys == 12_003
    assert r.get(active_generation_key("m1")) is None  # written, not yet active
    got = CacheEntry.decode(r.get(entity_key("m1", "g1", "c", "7")))
    assert got == customers["7"]
    assert 0 < r.ttl(entity_key("m1", "g1", "t", "2")) <= 600
    sample = [entity_key("m1", "g1", "c", "1").encode()]
    assert cw.switch_generation(redis_url, "m1", "g1", sample=sample) is None
    assert cw.active_generation(redis_url, "m1") == "g1"
    assert r.ttl(active_generation_key("m1")) == -1  # the pointer never expires
    cw.write_generation(redis_url, "m1", "g2", _entries(10, "g2"), {}, ttl_s=600)
    assert cw.switch_generation(redis_url, "m1", "g2") == "g1"
    assert cw.delete_generation(redis_url, "m1", "g1") == 12_003
    assert cw.active_generation(redis_url, "m1") == "g2"


def test_switch_refuses_when_sampled_keys_are_missing(redis_url):
    cw.write_items(redis_url, [(b"fs:1:m2:g1:c:1", b"{}")], 60)
    cw.switch_generation(redis_url, "m2", "g1")
    with pytest.raises(cw.CacheWriteError):
        cw.switch_generation(redis_url, "m2", "g2", sample=[b"fs:1:m2:g2:c:1"])
    assert cw.active_generation(redis_url, "m2") == "g1"


def test_failure_mid_write_raises_and_keeps_previous_generation(redis_server, redis_url):
    r = redis.Redis.from_url(redis_url)
    cw.write_items(redis_url, [(b"fs:1:m3:old:c:1", b"{}")], 60)
    cw.switch_generation(redis_url, "m3", "old")
    items = [(b"fs:1:m3:new:c:%d" % i, b"x" * 100) for i in range(20_000)]
    # a Redis that refuses writes part-way through (maxmemory reached -> OOM error replies)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", str(used + 300_000))
    r.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(cw.CacheWriteError, match="OOM|refused"):
            cw.write_items(redis_url, items, 60, chunk=500, connections=2)
    finally:
        r.config_set("maxmemory", "0")
    assert cw.active_generation(redis_url, "m3") == "old"
    cw.delete_generation(redis_url, "m3", "new")


def test_unreachable_redis_is_a_clear_error():
    from tests.servers.common import free_port

    with pytest.raises(cw.CacheWriteError, match="connect"):
        cw.write_items(f"redis://127.0.0.1:{free_port()}/0", [(b"k", b"v")], 60, timeout=1)


def test_every_key_is_written_with_its_ttl_and_counted(redis_url):
    # Speed is measured by bench/cache_write.py, not here.
    items = [(b"fs:1:m4:g:c:%d" % i, b'{"s":0.1,"f":{"nb_tx_1d":%d.0}}' % i) for i in range(50_000)]
    stats = cw.write_items(redis_url, items, 60, connections=4)
    r = redis.Redis.from_url(redis_url)
    assert stats.keys == 50_000 and stats.seconds > 0
    assert sum(1 for _ in r.scan_iter(match="fs:1:m4:g:c:*", count=5000)) == 50_000
    assert r.get(b"fs:1:m4:g:c:49999") == b'{"s":0.1,"f":{"nb_tx_1d":49999.0}}'
    assert 0 < r.ttl(b"fs:1:m4:g:c:0") <= 60
    r.flushdb()
