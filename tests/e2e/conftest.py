"""A trained model in a registry, a real Redis and the real service, for end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.training.registration import train_and_register
from tests.servers.redis import RedisServer
from tests.servers.scorer import ScorerProcess


@pytest.fixture(scope="session")
def model_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder whose SQLite registry holds one active model, trained on simulated payments."""
    from scoring_service.training.simulator import simulate

    data_dir = tmp_path_factory.mktemp("fs-e2e")
    settings = Settings(data_dir=data_dir)
    # No card testing here: these tests are about the service, and tests/e2e/test_intraday.py sets its own
    # velocity rules; a learnt velocity rule would make every test that pays twice a minute a burst.
    payments = simulate(n_customers=400, n_terminals=800, start_date="2018-04-01", n_days=50, seed=11,
                        card_testing_per_day=0.0)
    train_and_register(open_registry(settings), settings.models_dir, payments=payments, activate=True, description="e2e")
    return data_dir


@pytest.fixture(scope="session")
def active_model(model_data_dir: Path) -> ModelRecord:
    record = open_registry(Settings(data_dir=model_data_dir)).active()
    assert record is not None
    return record


@pytest.fixture(scope="module")
def scorer(model_data_dir: Path, redis_url: str) -> Iterator[ScorerProcess]:
    # CI machines are small and shared: a generous Redis timeout keeps these functional tests about
    # function (test_resilience.py tests the short timeouts and the breaker on purpose).
    env = {"FRAUDSCORE_REGISTRY_POLL_S": "0.5", "FRAUDSCORE_REDIS_TIMEOUT_MS": "80"}
    proc = ScorerProcess(model_data_dir, redis_url, env=env).start()
    yield proc
    proc.stop()


@pytest.fixture()
def stub(scorer: ScorerProcess) -> Iterator[object]:
    with grpc.insecure_channel(scorer.address) as channel:
        yield scorer.stub(channel)


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, which it may stop or freeze."""
    server = RedisServer().start()
    yield server
    server.stop()
