"""``fraudscore serve`` on a real 3-node Redis Cluster (FRAUDSCORE_REDIS_CLUSTER=true): an unseen card
is scored by the MODEL and written back (entry and intraday set) to the cluster; after the batch
writer writes and switches a generation (as the nightly does), its cards are answered from the CACHE."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redis.cluster import RedisCluster as RedisClusterClient

from scoring_service.adapters.redis.cache_writer import RedisCacheWriter, entry_items
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.core.cache_layout import CUSTOMER, CacheEntry, entity_key, intraday_key
from scoring_service.core.integrity import MacKeys
from scoring_service.protos import scoring_pb2
from tests.e2e.test_score_grpc import new_customer, request, usual_state
from tests.servers.redis import TEST_CACHE_MAC_KEYS
from tests.servers.redis_cluster import RedisCluster
from tests.servers.scorer import ScorerProcess


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(model_data_dir: Path, cluster: RedisCluster) -> Iterator[object]:
    env = {"FRAUDSCORE_REDIS_CLUSTER": "true", "FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}
    proc = ScorerProcess(model_data_dir, cluster.url, env=env).start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            yield proc.stub(channel)
    finally:
        proc.stop()


def test_an_unseen_card_is_scored_by_the_model_and_written_back_to_the_cluster(
        stub, cluster: RedisCluster, active_model: ModelRecord) -> None:
    customer = new_customer()
    first = stub.Score(request(customer), timeout=5)
    assert first.source == scoring_pb2.MODEL and not first.degraded  # the cluster answered the read
    key = entity_key(active_model.version, "0", CUSTOMER, customer)
    client = RedisClusterClient.from_url(cluster.url)
    for _ in range(100):  # the write-back is asynchronous
        if client.get(key) is not None:
            break
        time.sleep(0.05)
    raw = client.get(key)
    assert raw is not None and CacheEntry.decode(raw).origin == "online"
    # An online entry is re-judged by the model with the card's payments of today (intraday set, on the cluster).
    again = stub.Score(request(customer), timeout=5)
    assert again.source == scoring_pb2.MODEL and not again.degraded
    for _ in range(100):  # the intraday record is asynchronous too (it failed once on a loaded machine, read at once)
        if client.zcard(intraday_key(customer)) == 2:
            break
        time.sleep(0.05)
    assert client.zcard(intraday_key(customer)) == 2


def test_a_generation_switched_by_the_batch_writer_is_served(stub, active_model: ModelRecord,
                                                             cluster: RedisCluster) -> None:
    version = active_model.version
    customers = [new_customer() for _ in range(20)]  # spread over the three nodes
    risky = CacheEntry(0.99, usual_state(20, 25.0), version, 1_700_000_000.0, [("CARD_RISK", "f", 1.0)],
                       generation="e2e-g1")
    items = entry_items(version, "e2e-g1", dict.fromkeys(customers, risky), {})
    writer = RedisCacheWriter(cluster.url, ttl_s=600, mac=MacKeys.parse(TEST_CACHE_MAC_KEYS), cluster=True)
    assert writer.write_items(items).keys == 20
    assert stub.Score(request(customers[0], amount=150.0), timeout=5).source == scoring_pb2.MODEL  # not switched yet
    writer.switch_generation(version, "e2e-g1", [k for k, _ in items[:3]])
    for _ in range(100):  # the service re-reads the active generation every second
        if stub.Score(request(customers[1], amount=150.0), timeout=5).source == scoring_pb2.CACHE:
            break
        time.sleep(0.1)
    answers = [stub.Score(request(c, amount=150.0), timeout=5) for c in customers[1:]]
    assert [(a.source, round(a.risk_score, 2)) for a in answers] == [(scoring_pb2.CACHE, 0.99)] * 19
