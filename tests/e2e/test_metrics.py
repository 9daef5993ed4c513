"""The Prometheus endpoint of a real `fraudscore serve` under load: the counts match the load sent,
and a shifted input shows up as a flagged feature (PSI past the threshold)."""

from __future__ import annotations

import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.protos import scoring_pb2
from tests.servers.common import free_port
from tests.servers.scorer import ScorerProcess

N_SCORE, N_BATCH, BATCH_ITEMS, N_BAD = 240, 6, 5, 7


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the endpoint: {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    return sum(v for k, v in samples.items() if all((name, value) in k for name, value in labels.items()))


def request(amount: float, customer: str | None = None) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
        transaction_id=uuid.uuid4().hex, customer_id=customer or f"m-{uuid.uuid4().hex[:12]}", terminal_id="17",
        amount=amount))


@pytest.fixture(scope="module")
def served(model_data_dir: Path, redis_url: str) -> Iterator[tuple[ScorerProcess, int]]:
    port = free_port()
    env = {"FRAUDSCORE_REGISTRY_POLL_S": "0.5", "FRAUDSCORE_REDIS_TIMEOUT_MS": "80", "FRAUDSCORE_METRICS_PORT": str(port),
           "FRAUDSCORE_LOG_REQUESTS": "false", "FRAUDSCORE_AUTH": "off", "FRAUDSCORE_MAX_QUEUE_MS": "0"}
    proc = ScorerProcess(model_data_dir, redis_url, env=env).start(timeout=240)  # a loaded CI box starts slowly
    yield proc, port
    proc.stop()


def in_distribution_amounts(record: ModelRecord, n: int, seed: int) -> list[float]:
    """Amounts drawn bin by bin from the model's training profile (10 % per decile): PSI near 0."""
    edges = record.params["drift_profile"]["amount"]["edges"]
    shares = record.params["drift_profile"]["amount"]["shares"]
    rng = np.random.default_rng(seed)
    bounds = [0.0, *edges, edges[-1] * 1.5]
    picks = rng.choice(len(shares), size=n, p=np.asarray(shares) / sum(shares))
    return [float(rng.uniform(bounds[i] + 1e-6, bounds[i + 1])) for i in picks]


def test_counts_match_the_load_sent_and_a_shifted_amount_is_flagged(
    served: tuple[ScorerProcess, int], active_model: ModelRecord
) -> None:
    proc, port = served
    amounts = in_distribution_amounts(active_model, N_SCORE, seed=5)
    with grpc.insecure_channel(proc.address) as channel, ThreadPoolExecutor(8) as pool:
        stub = proc.stub(channel)
        answers = list(pool.map(lambda a: stub.Score(request(a), timeout=5), amounts))
        for _ in range(N_BATCH):
            stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(requests=[request(a) for a in amounts[:BATCH_ITEMS]]), timeout=5)
        for _ in range(N_BAD):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request(float("nan")), timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        m = scrape(port)

        # answers by gRPC code, the invalid ones included
        assert total(m["fraudscore_answers_total"], method="Score", code="OK") == N_SCORE
        assert total(m["fraudscore_answers_total"], method="Score", code="INVALID_ARGUMENT") == N_BAD
        assert total(m["fraudscore_answers_total"], method="ScoreBatch", code="OK") == N_BATCH
        # one latency observation per answered payment, by source and decision
        model_answers = sum(1 for a in answers if a.source == scoring_pb2.MODEL)
        assert total(m["fraudscore_answer_latency_seconds_count"], method="Score") == N_SCORE
        assert total(m["fraudscore_answer_latency_seconds_count"], method="Score", source="MODEL") == model_answers
        assert total(m["fraudscore_answer_latency_seconds_count"], method="ScoreBatch") == N_BATCH * BATCH_ITEMS
        served_payments = N_SCORE + N_BATCH * BATCH_ITEMS
        assert total(m["fraudscore_answers_by_version_total"], version=active_model.version) == served_payments
        # every payment looked its card up once: hits + misses + errors
        assert total(m["fraudscore_cache_lookups_total"]) == served_payments
        assert total(m["fraudscore_cache_lookups_total"], result="miss") >= model_answers  # new cards
        assert total(m["fraudscore_redis_breaker_state"]) == 0
        # the micro-batcher scored at least every MODEL answer's row, on the CPU
        assert total(m["fraudscore_batch_size_sum"]) >= model_answers
        assert total(m["fraudscore_inference_seconds_count"], device="cpu") >= 1
        assert total(m["fraudscore_batch_wait_seconds_count"]) == total(m["fraudscore_batch_size_sum"])
        assert total(m["fraudscore_model_version_info"], role="active", version=active_model.version) == 1

        # drift: amounts as in training are not flagged...
        assert total(m["fraudscore_drift_rows"]) == model_answers + N_BATCH * BATCH_ITEMS
        psi_before = total(m["fraudscore_feature_psi"], feature="amount")
        assert psi_before < 0.2
        assert total(m["fraudscore_feature_drift_flagged"], feature="amount") == 0
        # ...amounts 50x larger are
        list(pool.map(lambda a: stub.Score(request(a * 50 + 5_000), timeout=5), amounts))
        m = scrape(port)
    assert total(m["fraudscore_feature_psi"], feature="amount") > 0.2 > psi_before
    assert total(m["fraudscore_feature_drift_flagged"], feature="amount") == 1
    assert ("version", active_model.version) in next(iter(m["fraudscore_score_psi"]))
