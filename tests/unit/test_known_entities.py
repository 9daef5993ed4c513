"""The batch generation's manifest (core.known_entities): exact membership, a byte form that round-trips."""

from __future__ import annotations

import pytest

from scoring_service.core.cache_layout import entity_key, entity_of_key
from scoring_service.core.known_entities import KnownEntities


def test_it_holds_exactly_the_entities_written():
    known = KnownEntities.of([("c", f"card-{i}") for i in range(1000)] + [("t", "T1"), ("t", "with:colons:0:")])
    assert len(known) == 1002
    assert all(known.contains("c", f"card-{i}") for i in range(1000))
    assert known.contains("t", "with:colons:0:") and known.contains("t", "T1")
    assert not known.contains("t", "card-1")  # the kind is part of the identity
    assert not any(known.contains("c", f"card-{i}") for i in range(1000, 3000))
    assert not KnownEntities.empty().contains("c", "card-1")


def test_its_bytes_round_trip_and_anything_else_is_refused():
    known = KnownEntities.of([("c", "a"), ("c", "b"), ("c", "a")])
    again = KnownEntities.decode(known.encode())
    assert len(again) == 2 and again.contains("c", "b")
    for bad in (b"", b"fsk1" + b"\0" * 7, b"json" + b"\0" * 8):
        with pytest.raises(ValueError):
            KnownEntities.decode(bad)


def test_an_entity_key_names_its_entity_whatever_the_id_holds():
    assert entity_of_key(entity_key("v1", "g7", "c", "a:b:0:c").encode()) == ("c", "a:b:0:c")
    assert entity_of_key("fs:1:v1:active") is None and entity_of_key("fs:1:v1:g7:manifest") is None


def test_the_cache_keeps_the_last_verified_manifest_when_the_pointer_vanishes():
    import asyncio

    from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
    from scoring_service.core.integrity import MacKeys

    cache = EntityCache("redis://127.0.0.1:1/0", timeout_s=0.01, ttl_s=60, breaker=CircuitBreaker(5, 1.0),
                        mac=MacKeys([("k", b"a-test-key-of-16-bytes")]))
    assert not cache.knows("v1", "c", "card")  # the online generation, nothing verified: a new card
    cache._generations["v1"] = "g1"
    assert cache.knows("v1", "c", "card")  # a batch generation whose manifest never verified: fail closed
    cache._known["v1"] = ("g1", KnownEntities.of([("c", "card")]))
    assert cache.knows("v1", "c", "card") and not cache.knows("v1", "c", "other")
    cache._generations["v1"] = "0"  # the pointer deleted, or Redis restarted empty
    assert cache.knows("v1", "c", "card") and not cache.knows("v1", "c", "other")
    asyncio.run(cache.close())
