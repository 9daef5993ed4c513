"""The whole offline-to-online path: Kafka -> ``nightly`` -> Redis -> the real service answers CACHE."""

from __future__ import annotations

from pathlib import Path

import grpc
import pandas as pd
import pytest

from scoring_service.bootstrap import run_nightly
from scoring_service.protos import scoring_pb2
from tests.integration.batch.conftest import AS_OF, settings_for
from tests.servers.scorer import ScorerProcess

pytestmark = pytest.mark.integration
AS_OF_S = pd.Timestamp(AS_OF).value / 1e9


def test_service_answers_from_the_generation_the_nightly_run_wrote(kafka_bootstrap, published, batch_env, redis_url,
                                                                   handbook_slice):
    settings = settings_for(batch_env, kafka_bootstrap, published, redis_url)
    run = run_nightly(settings, as_of=AS_OF_S, show_progress=False)
    ts = handbook_slice["timestamp"]
    window = handbook_slice.loc[(ts >= pd.Timestamp(AS_OF) - pd.Timedelta(days=30)) & (ts < pd.Timestamp(AS_OF))]
    known = window.drop_duplicates("customer_id").sample(8, random_state=3)
    unseen_customer = "never-paid-" + run.generation

    scorer = ScorerProcess(Path(batch_env["FRAUDSCORE_DATA_DIR"]), redis_url,
                           env={"FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}).start()
    try:
        with grpc.insecure_channel(scorer.address) as channel:
            stub = scorer.stub(channel)

            def score(customer: str, terminal: str, amount: float) -> scoring_pb2.ScoreResponse:
                tx = scoring_pb2.Transaction(transaction_id=f"tx-{customer}", customer_id=customer,
                                             terminal_id=terminal, amount=amount)
                return stub.Score(scoring_pb2.ScoreRequest(transaction=tx), timeout=5)

            for row in known.itertuples():
                resp = score(str(row.customer_id), str(row.terminal_id), float(row.amount))
                assert resp.source == scoring_pb2.CACHE, (row.customer_id, resp)
                assert resp.model_version == run.model_version and not resp.degraded
                assert resp.scored_at.seconds == int(AS_OF_S)  # the batch's time, not the request's
                assert resp.reasons
            miss = score(unseen_customer, str(known.iloc[0]["terminal_id"]), 10.0)
            assert miss.source == scoring_pb2.MODEL
    finally:
        scorer.stop()
