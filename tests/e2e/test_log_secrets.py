"""The log grep: a full run of the real service (two workers, authentication on, a Redis with a
password, MAC and log keys configured) fed card numbers, raw ids, a wrong API key and a forged
cache entry; then every secret and raw id is searched for in everything the service wrote."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from scoring_service import bootstrap
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.config import Settings
from scoring_service.core.cache_layout import CUSTOMER, active_generation_key, entity_key
from scoring_service.protos import scoring_pb2
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess

REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex[:12]
MAC_SECRET = "mac-secret-" + uuid.uuid4().hex
LOG_KEY = "log-key-" + uuid.uuid4().hex
PEPPER = "pepper-" + uuid.uuid4().hex
CARD_NUMBER = "4" + str(uuid.uuid4().int)[:15]  # 16 digits, as a caller might put a PAN in request_id
CUSTOMERS = [f"cust-{uuid.uuid4().hex[:10]}" for _ in range(3)]
TERMINALS = [f"term-{uuid.uuid4().hex[:10]}" for _ in range(3)]
WRONG_KEY = "fsk_" + uuid.uuid4().hex + uuid.uuid4().hex[:11]


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--requirepass", REDIS_PASSWORD)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_key(model_data_dir: Path) -> str:
    _, key = bootstrap.key_store(Settings(data_dir=model_data_dir, key_pepper=PEPPER)).create("log-grep", ["score"])
    assert key is not None
    return key


@pytest.fixture(scope="module")
def scorer(model_data_dir: Path, locked_redis: RedisServer, api_key: str) -> Iterator[ScorerProcess]:
    env = {"FRAUDSCORE_AUTH": "required", "FRAUDSCORE_KEY_PEPPER": PEPPER, "FRAUDSCORE_CACHE_MAC_KEYS": f"k1:{MAC_SECRET}",
           "FRAUDSCORE_LOG_ID_KEY": LOG_KEY, "FRAUDSCORE_REDIS_TIMEOUT_MS": "200", "FRAUDSCORE_LOG_LEVEL": "debug"}
    proc = ScorerProcess(model_data_dir, locked_redis.url_for(None, REDIS_PASSWORD), env=env,
                         args=["--workers", "2"]).start()
    yield proc
    proc.stop()


def _request(i: int, request_id: str) -> scoring_pb2.ScoreRequest:
    tx = scoring_pb2.Transaction(transaction_id=f"tx-{CARD_NUMBER}-{i}", customer_id=CUSTOMERS[i % 3],
                                 terminal_id=TERMINALS[i % 3], amount=20.0 + i)
    return scoring_pb2.ScoreRequest(request_id=request_id, transaction=tx)


def test_no_secret_and_no_raw_id_reaches_the_logs(scorer: ScorerProcess, locked_redis: RedisServer, api_key: str,
                                                  active_model: ModelRecord) -> None:
    client = redis.Redis.from_url(locked_redis.url_for(None, REDIS_PASSWORD))
    gen = (client.get(active_generation_key(active_model.version)) or b"0").decode()
    client.set(entity_key(active_model.version, gen, CUSTOMER, CUSTOMERS[0]), b'{"s":0.0}')  # forged: logged, rejected
    with grpc.insecure_channel(scorer.address) as channel:
        stub = scorer.stub(channel)
        for i in range(12):
            answer = stub.Score(_request(i, f"order-{CARD_NUMBER}-{i}"), metadata=(("x-api-key", api_key),), timeout=10)
            assert answer.decision in (scoring_pb2.APPROVE, scoring_pb2.REVIEW, scoring_pb2.DECLINE)
        long_id = "x" * 120  # the contract allows 128
        stub.Score(_request(12, long_id), metadata=(("x-api-key", api_key),), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(_request(13, "r"), metadata=(("x-api-key", WRONG_KEY),), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    scorer.stop()  # the drain and shutdown lines too
    logs = scorer.logs()

    # The run did log what the test looks at: one line per payment, its ids hashed with the log key.
    scores = scorer.log_events("score")
    assert len(scores) >= 13
    hashed = hmac.new(LOG_KEY.encode(), CUSTOMERS[1].encode(), hashlib.sha256).hexdigest()[:16]
    assert any(e.get("customer") == hashed for e in scores)
    assert any("[digits]" in e.get("request_id", "") for e in scores)
    assert max(len(e.get("request_id", "")) for e in scores) <= 64
    assert scorer.log_events("cache.mac_rejected")

    secrets = {"Redis password": REDIS_PASSWORD, "MAC secret": MAC_SECRET, "log id key": LOG_KEY, "pepper": PEPPER,
               "API key": api_key, "wrong API key": WRONG_KEY, "card number": CARD_NUMBER}
    raw_ids = {f"customer {c}": c for c in CUSTOMERS} | {f"terminal {t}": t for t in TERMINALS}
    found = [name for name, value in (secrets | raw_ids).items() if value in logs]
    assert not found, f"in the service's logs: {found}"
