"""Decisions that cannot be steered (issue 21), against the real service on a real Redis, on the
service's own clock: a batch generation written by the batch jobs' writer (sealed entries and the
sealed manifest of the entities it holds), then what an attacker with Redis write access, or a
caller's clock, or a Redis that stops answering, does to the answers. None may turn toward APPROVE.

The model is the e2e one, registered again with velocity rules (review at 5 payments in an hour,
decline at 15) and decision thresholds (review 0.5, decline 0.9) above what it says of small
payments, so a new card's small payment is an APPROVE and the velocity floors show every count.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.core.cache_layout import CUSTOMER, TERMINAL, CacheEntry, entity_key, intraday_key
from scoring_service.core.features.state import EMPTY_TERMINAL_STATE
from scoring_service.core.integrity import MacKeys
from scoring_service.protos import scoring_pb2
from tests.e2e.test_intraday import VELOCITY
from tests.e2e.test_score_grpc import usual_state
from tests.servers.common import free_port
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e

MAC = ("steer", b"e2e-steering-mac-key-61b2c9")
TERMINAL_ID = "T-steer"


@pytest.fixture(scope="module")
def steer_dir(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("fs-steer") / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = open_registry(Settings(data_dir=data_dir))
    active = registry.active()
    assert active is not None
    registry.register(
        version=active.version + "-steer", framework=active.framework, artifact_path=active.artifact_path,
        sha256=active.sha256, feature_names=active.feature_names, thresholds={"review": 0.5, "decline": 0.9},
        policy={**active.policy, **VELOCITY}, metrics=active.metrics, description="e2e: steering", activate=True,
    )
    return data_dir


def _version(data_dir: Path) -> str:
    record = open_registry(Settings(data_dir=data_dir)).active()
    assert record is not None
    return record.version


def _start(data_dir: Path, redis_server: RedisServer) -> ScorerProcess:
    env = {"FRAUDSCORE_CLOCK": "service", "FRAUDSCORE_CACHE_MAC_KEYS": f"{MAC[0]}:{MAC[1].decode()}",
           "FRAUDSCORE_METRICS_PORT": str(free_port()), "FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}
    return ScorerProcess(data_dir, redis_server.url, env=env).start()


def _card() -> str:
    return f"card-{uuid.uuid4().hex[:12]}"


def _request(card: str, amount: float = 2.0, at: float | None = None, tx: str | None = None) -> scoring_pb2.ScoreRequest:
    r = scoring_pb2.ScoreRequest(request_id=uuid.uuid4().hex, transaction=scoring_pb2.Transaction(
        transaction_id=tx or uuid.uuid4().hex, customer_id=card, terminal_id=TERMINAL_ID, amount=amount))
    r.transaction.timestamp.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return r


def _decision(answer: scoring_pb2.ScoreResponse) -> str:
    return scoring_pb2.Decision.Name(answer.decision)


def _batch_generation(url: str, version: str, generation: str, compromised: list[str]) -> None:
    """What a nightly run writes: the cards it found compromised (risk 0.99) and the terminal, sealed,
    then the manifest and the switch (the batch jobs' own writer)."""
    writer = RedisCacheWriter(url, ttl_s=600, connections=1, mac=MacKeys([MAC]))
    at = time.time() - 3600
    items = [(entity_key(version, generation, CUSTOMER, card).encode(),
              CacheEntry(0.99, usual_state(20, 25.0, at), version, at, [("CARD_RISK", "f", 1.0)], generation).encode())
             for card in compromised]
    items.append((entity_key(version, generation, TERMINAL, TERMINAL_ID).encode(),
                  CacheEntry(0.01, dict(EMPTY_TERMINAL_STATE), version, at, [], generation).encode()))
    writer.write_items(items)
    writer.switch_generation(version, generation, [k for k, _ in items])


def _wait_cache_answer(stub: object, card: str) -> scoring_pb2.ScoreResponse:
    deadline = time.monotonic() + 15
    while True:  # the service re-reads the active generation (and its manifest) every second
        answer = stub.Score(_request(card), timeout=5)  # type: ignore[attr-defined]
        if answer.source == scoring_pb2.CACHE or time.monotonic() > deadline:
            return answer
        time.sleep(0.3)


def integrity(scorer: ScorerProcess, reason: str) -> float:
    port = scorer.env["FRAUDSCORE_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    prefix = f'fraudscore_cache_integrity_total{{reason="{reason}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scorer(steer_dir: Path, redis_server: RedisServer) -> Iterator[ScorerProcess]:
    proc = _start(steer_dir, redis_server)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def compromised(steer_dir: Path, redis_server: RedisServer) -> list[str]:
    cards = [_card() for _ in range(3)]
    _batch_generation(redis_server.url, _version(steer_dir), "g-steer-1", cards)
    return cards


@pytest.fixture()
def stub(scorer: ScorerProcess) -> Iterator[object]:
    with grpc.insecure_channel(scorer.address) as channel:
        yield scorer.stub(channel)


def test_deleting_or_forging_a_batch_entry_never_turns_a_decline_into_an_approve(stub, scorer, compromised, steer_dir,
                                                                               redis_server: RedisServer) -> None:
    version, client = _version(steer_dir), redis.Redis.from_url(redis_server.url)
    deleted, unsealed, control = compromised
    for card in compromised:
        answer = _wait_cache_answer(stub, card)
        assert (answer.source, _decision(answer)) == (scoring_pb2.CACHE, "DECLINE")
    missing_before, rejected_before = integrity(scorer, "customer_missing"), integrity(scorer, "customer_rejected")

    client.delete(entity_key(version, "g-steer-1", CUSTOMER, deleted))  # DEL, or an eviction
    client.set(entity_key(version, "g-steer-1", CUSTOMER, unsealed), CacheEntry(  # an unsealed low risk
        0.0, usual_state(20, 25.0), version, time.time(), [], "g-steer-1").encode())
    for card in (deleted, unsealed):
        answer = stub.Score(_request(card), timeout=5)
        assert _decision(answer) != "APPROVE" and answer.degraded, answer
        assert answer.reasons[0].code == "ENTITY_STATE_UNAVAILABLE"
    assert integrity(scorer, "customer_missing") >= missing_before + 1
    assert integrity(scorer, "customer_rejected") >= rejected_before + 1
    # never written back as a new card's entry: the next payment is floored again, not a MODEL APPROVE
    time.sleep(0.5)
    assert client.get(entity_key(version, "g-steer-1", CUSTOMER, deleted)) is None
    assert _decision(stub.Score(_request(deleted), timeout=5)) != "APPROVE"
    assert _decision(stub.Score(_request(control), timeout=5)) == "DECLINE"  # untouched: still the batch's answer
    # A card no batch run knows is a new card: the model's APPROVE stands, not degraded.
    new = stub.Score(_request(_card()), timeout=5)
    assert (new.source, _decision(new), new.degraded) == (scoring_pb2.MODEL, "APPROVE", False)


def test_deleting_a_cards_intraday_set_after_a_burst_changes_no_answer(stub, compromised,
                                                                     redis_server: RedisServer) -> None:
    card = _card()
    burst = [stub.Score(_request(card), timeout=5) for _ in range(8)]
    assert [_decision(a) for a in burst] == ["APPROVE"] * 4 + ["REVIEW"] * 4
    time.sleep(2.5)  # past the time a background intraday write may take (recent_payments.SETTLE_S)
    client = redis.Redis.from_url(redis_server.url)
    assert client.delete(intraday_key(card)) == 1
    ninth = stub.Score(_request(card), timeout=5)
    assert _decision(ninth) == "REVIEW"
    assert next(r.contribution for r in ninth.reasons if r.code == "CARD_VELOCITY_1H_HIGH") == 9.0


def test_twelve_payments_in_one_second_are_a_burst_whatever_their_timestamps(stub, compromised) -> None:
    card, now = _card(), time.time()
    stamps = [now - 7200 * i for i in range(6)] + [now + 60 * i for i in range(1, 7)]  # back hours, ahead minutes
    answers = [stub.Score(_request(card, at=t), timeout=5) for t in stamps]
    assert [_decision(a) for a in answers] == ["APPROVE"] * 4 + ["REVIEW"] * 8


def test_a_known_card_is_floored_while_redis_cannot_be_read(steer_dir: Path) -> None:
    own = RedisServer().start()
    scorer = None
    try:
        known = _card()
        _batch_generation(own.url, _version(steer_dir), "g-steer-down", [known])
        scorer = _start(steer_dir, own)
        with grpc.insecure_channel(scorer.address) as channel:
            stub = scorer.stub(channel)
            assert _decision(_wait_cache_answer(stub, known)) == "DECLINE"
            own.stop()
            answer = stub.Score(_request(known), timeout=5)
            assert answer.degraded and _decision(answer) != "APPROVE", answer
            new = stub.Score(_request(_card()), timeout=5)
            assert new.degraded and (new.source, _decision(new)) == (scoring_pb2.MODEL, "APPROVE")
            assert integrity(scorer, "cache_unavailable") >= 1
    finally:
        if scorer is not None:
            scorer.stop()
        own.stop()
