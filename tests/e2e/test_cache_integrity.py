"""The cache an attacker cannot quietly rewrite: the real service on a real Redis, entries forged
with ``redis-cli``, and a MAC key rotation in progress (two keys configured: ``new`` signs, both verify)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core.cache_layout import CUSTOMER, CacheEntry, active_generation_key, entity_key, seal
from scoring_service.core.integrity import MacKeys
from scoring_service.protos import scoring_pb2
from tests.e2e.test_score_grpc import new_customer, request, usual_state
from tests.servers.common import free_port, require_binary
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess

NEW = ("new", b"e2e-integrity-new-key-2f9a61")
OLD = ("old", b"e2e-integrity-old-key-8c03d4")
KEYS_SETTING = f"{NEW[0]}:{NEW[1].decode()},{OLD[0]}:{OLD[1].decode()}"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scorer(model_data_dir: Path, redis_server: RedisServer) -> Iterator[ScorerProcess]:
    env = {"FRAUDSCORE_CACHE_MAC_KEYS": KEYS_SETTING, "FRAUDSCORE_METRICS_PORT": str(free_port()),
           "FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}
    proc = ScorerProcess(model_data_dir, redis_server.url, env=env).start()
    yield proc
    proc.stop()


@pytest.fixture()
def stub(scorer: ScorerProcess) -> Iterator[object]:
    with grpc.insecure_channel(scorer.address) as channel:
        yield scorer.stub(channel)


def rejected_total(scorer: ScorerProcess) -> float:
    """``fraudscore_cache_mac_rejected_total`` summed over kinds, from the scorer's /metrics."""
    port = scorer.env["FRAUDSCORE_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("fraudscore_cache_mac_rejected_total{"))


def card_key(redis_server: RedisServer, version: str, customer: str) -> str:
    gen = (redis.Redis.from_url(redis_server.url).get(active_generation_key(version)) or b"0").decode()
    return entity_key(version, gen, CUSTOMER, customer)


def risky_entry(version: str) -> CacheEntry:
    """A card the nightly run found compromised (risk 0.99)."""
    return CacheEntry(0.99, usual_state(20, 25.0), version, 1_700_000_000.0, [("CARD_RISK", "f", 1.0)])


def test_a_forged_entry_written_with_redis_cli_is_scored_by_the_model(stub, scorer, redis_server: RedisServer,
                                                                      active_model: ModelRecord) -> None:
    customer = new_customer()
    key = card_key(redis_server, active_model.version, customer)
    client = redis.Redis.from_url(redis_server.url)
    client.set(key, seal(MacKeys([NEW]), key, risky_entry(active_model.version).encode()))
    genuine = stub.Score(request(customer, amount=150.0), timeout=5)
    assert (genuine.source, round(genuine.risk_score, 2)) == (scoring_pb2.CACHE, 0.99)

    # The attacker rewrites the card's entry: low risk, a batch run's origin, no (valid) seal.
    forged = CacheEntry(0.0, usual_state(20, 25.0), active_model.version, time.time(), [("LOW_RISK", "f", -1.0)])
    before = rejected_total(scorer)
    cli = require_binary("redis-cli", "apt-get install -y redis-tools")
    subprocess.run([cli, "-p", str(redis_server.port), "SET", key, forged.encode().decode()], check=True,
                   capture_output=True, timeout=10)
    answer = stub.Score(request(customer, amount=150.0), timeout=5)
    assert answer.source == scoring_pb2.MODEL  # not CACHE with the forged 0.0
    assert rejected_total(scorer) >= before + 1

    # An altered sealed entry (the risk edited, the seal kept) does not verify either.
    sealed = seal(MacKeys([NEW]), key, risky_entry(active_model.version).encode())
    client.set(key, sealed.replace(b'"s":0.99', b'"s":0.01'))
    before = rejected_total(scorer)
    assert stub.Score(request(customer, amount=150.0), timeout=5).source == scoring_pb2.MODEL
    assert rejected_total(scorer) >= before + 1

    # The rejection is logged (rate-limited), without the card's id; the forged entry is replaced by
    # the service's own sealed write-back.
    events = scorer.log_events("cache.mac_rejected")
    assert events and all(customer not in json.dumps(e) for e in events)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (client.get(key) or b"").startswith(b"$m1$new$"):
        time.sleep(0.1)
    assert (client.get(key) or b"").startswith(b"$m1$new$")


def test_entries_signed_with_the_old_key_verify_while_both_keys_are_configured(stub, scorer, redis_server: RedisServer,
                                                                             active_model: ModelRecord) -> None:
    client = redis.Redis.from_url(redis_server.url)
    by_old, by_unknown = new_customer(), new_customer()
    key_old = card_key(redis_server, active_model.version, by_old)
    client.set(key_old, seal(MacKeys([OLD]), key_old, risky_entry(active_model.version).encode()))
    key_unknown = card_key(redis_server, active_model.version, by_unknown)
    retired = MacKeys([("retired", b"a-key-no-longer-configured")])
    client.set(key_unknown, seal(retired, key_unknown, risky_entry(active_model.version).encode()))

    old = stub.Score(request(by_old, amount=150.0), timeout=5)
    assert (old.source, round(old.risk_score, 2)) == (scoring_pb2.CACHE, 0.99)
    before = rejected_total(scorer)
    assert stub.Score(request(by_unknown, amount=150.0), timeout=5).source == scoring_pb2.MODEL
    assert rejected_total(scorer) >= before + 1
