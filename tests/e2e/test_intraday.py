"""Intraday state end to end: the real service, real Redis, real gRPC, a real nightly run mid-burst.

The model is the e2e one, registered again as a new version whose policy has velocity thresholds
(review at 5 payments in an hour, decline at 15) and whose decision thresholds (review 0.5,
decline 0.9) sit above what the model says of small payments, so the velocity floors decide, and
every answer of a burst shows the count the service saw: none lost, none counted twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.protos import scoring_pb2
from tests.servers.common import REPO_ROOT
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.e2e

VELOCITY = {"velocity_1h_review": 5.0, "velocity_1h_decline": 15.0,
            "velocity_1h_review_fraud_rate": 0.0, "velocity_1h_decline_fraud_rate": 0.0}


@pytest.fixture(scope="module")
def velocity_dir(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("fs-intraday") / "data"
    shutil.copytree(model_data_dir, data_dir)
    registry = open_registry(Settings(data_dir=data_dir))
    active = registry.active()
    assert active is not None
    registry.register(
        version=active.version + "-velocity", framework=active.framework, artifact_path=active.artifact_path,
        sha256=active.sha256, feature_names=active.feature_names, thresholds={"review": 0.5, "decline": 0.9},
        policy={**active.policy, **VELOCITY}, metrics=active.metrics, description="e2e: velocity rules", activate=True,
    )
    return data_dir


@pytest.fixture(scope="module")
def velocity_scorer(velocity_dir: Path, redis_url: str) -> Iterator[ScorerProcess]:
    proc = ScorerProcess(velocity_dir, redis_url, env={"FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}).start()
    yield proc
    proc.stop()


@pytest.fixture()
def stub(velocity_scorer: ScorerProcess) -> Iterator[object]:
    with grpc.insecure_channel(velocity_scorer.address) as channel:
        yield velocity_scorer.stub(channel)


def _request(card: str, tx: str, amount: float, at: float) -> scoring_pb2.ScoreRequest:
    r = scoring_pb2.ScoreRequest(request_id=uuid.uuid4().hex, transaction=scoring_pb2.Transaction(
        transaction_id=tx, customer_id=card, terminal_id="T-intraday", amount=amount))
    r.transaction.timestamp.FromNanoseconds(int(at * 1e9))
    return r


def _velocity(resp: scoring_pb2.ScoreResponse) -> float | None:
    return next((r.contribution for r in resp.reasons if r.code == "CARD_VELOCITY_1H_HIGH"), None)


def _card() -> str:
    return f"card-{uuid.uuid4().hex[:12]}"


def test_a_burst_of_20_payments_in_a_minute_is_visible_in_the_answers(stub):
    card, t0 = _card(), time.time() - 120
    answers = [stub.Score(_request(card, f"{card}-{i}", 2.0, t0 + 3 * i), timeout=2) for i in range(1, 21)]
    assert [_velocity(a) for a in answers[4:]] == [float(k) for k in range(5, 21)]
    decisions = [scoring_pb2.Decision.Name(a.decision) for a in answers]
    assert decisions == ["APPROVE"] * 4 + ["REVIEW"] * 10 + ["DECLINE"] * 6
    assert all(not a.degraded for a in answers)


def test_the_same_transaction_sent_twice_counts_once(stub):
    card, t0 = _card(), time.time() - 120
    for i in range(1, 5):
        stub.Score(_request(card, f"{card}-{i}", 2.0, t0 + i), timeout=2)
    first = stub.Score(_request(card, f"{card}-5", 2.0, t0 + 5), timeout=2)
    retry = stub.Score(_request(card, f"{card}-5", 2.0, t0 + 5), timeout=2)
    after = stub.Score(_request(card, f"{card}-6", 2.0, t0 + 6), timeout=2)
    assert _velocity(first) == _velocity(retry) == 5.0 and _velocity(after) == 6.0
    assert (first.risk_score, first.decision) == (retry.risk_score, retry.decision)


def test_after_5000_the_card_paying_10_is_answered_on_that_payment(stub):
    card, t0 = _card(), time.time() - 60
    first = stub.Score(_request(card, f"{card}-1", 5000.0, t0), timeout=2)
    second = stub.Score(_request(card, f"{card}-2", 10.0, t0 + 1), timeout=2)
    assert first.decision == scoring_pb2.DECLINE
    assert second.source == scoring_pb2.MODEL and second.decision != scoring_pb2.DECLINE
    # the model's reasons for a payment of 10, not the first payment's amount rule
    assert {r.code for r in second.reasons}.isdisjoint({"AMOUNT_HIGH", "AMOUNT_ABOVE_HIGH_LIMIT"})


def test_a_nightly_switch_in_the_middle_of_a_burst_loses_none_of_it(stub, velocity_dir, redis_url, tmp_path):
    card, t0 = _card(), time.time() - 300
    burst = [(f"{card}-{i}", t0 + 3 * i) for i in range(1, 21)]
    before = [stub.Score(_request(card, tx, 2.0, at), timeout=2) for tx, at in burst[:10]]
    assert before[-1].source == scoring_pb2.MODEL  # a card no batch run knows yet
    # The event log holds the first ten payments; the nightly runs as of just after the tenth.
    events = tmp_path / "events.parquet"
    pd.DataFrame({"transaction_id": [tx for tx, _ in burst[:10]], "customer_id": card, "terminal_id": "T-intraday",
                  "amount": 2.0, "timestamp": pd.to_datetime([at for _, at in burst[:10]], unit="s")}).to_parquet(events)
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(velocity_dir), "REDIS_URL": redis_url, "FRAUDSCORE_LOG_FORMAT": "json"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    subprocess.run([sys.executable, "-m", "scoring_service.cli", "nightly", "--source", str(events),
                    "--as-of", repr(burst[9][1] + 0.5), "--json"], cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    time.sleep(1.5)  # the service re-reads the active generation every second
    after = [stub.Score(_request(card, tx, 2.0, at), timeout=2) for tx, at in burst[10:]]
    assert all(a.source == scoring_pb2.CACHE for a in after)  # the card is the nightly's now
    assert [_velocity(a) for a in after] == [float(k) for k in range(11, 21)]
