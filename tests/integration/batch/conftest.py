"""Batch-job fixtures: a real Kafka broker, the handbook slice published once, a small model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import handbook_path

# A slice of the handbook keeps the suite fast: customers with id < 1000 (a fifth of the cards,
# every terminal they use), 45 days up to AS_OF. ~85,000 payments, ~170,000 events.
SLICE_START = "2018-07-01"
AS_OF = "2018-08-15"
MAX_CUSTOMER = 1000


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from tests.servers.kafka import KafkaServer

    server = KafkaServer().start()
    yield server.bootstrap
    server.stop()


@pytest.fixture(scope="session")
def handbook_slice() -> pd.DataFrame:
    import pyarrow.parquet as pq

    from scoring_service.core.features import normalise_handbook

    path = handbook_path()
    if path is None:  # a clone without ../shared: simulated payments in the handbook's format
        import warnings

        from scoring_service.training.simulator import simulate

        warnings.warn("handbook parquet not found (FRAUDSCORE_HANDBOOK): batch tests use simulated payments", stacklevel=2)
        raw = simulate(n_customers=MAX_CUSTOMER, n_terminals=2000, start_date="2018-04-01", n_days=137, seed=5)
        raw = raw[(raw["TX_DATETIME"] >= pd.Timestamp(SLICE_START)) & (raw["TX_DATETIME"] < pd.Timestamp(AS_OF))]
        return normalise_handbook(raw.reset_index(drop=True))
    table = pq.read_table(path, filters=[("CUSTOMER_ID", "<", MAX_CUSTOMER),
                                         ("TX_DATETIME", ">=", pd.Timestamp(SLICE_START)),
                                         ("TX_DATETIME", "<", pd.Timestamp(AS_OF))])
    return normalise_handbook(table.to_pandas())


def generation_contents(r, model: str, gen: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Every entry of one cache generation, keyed by ``kind:id``, without the generation field."""
    import json

    from scoring_service.core.cache_layout import entity_of_key, generation_pattern, open_sealed
    from scoring_service.core.integrity import MacKeys
    from tests.servers.redis import TEST_CACHE_MAC_KEYS

    keys = MacKeys.parse(TEST_CACHE_MAC_KEYS)  # the batch runs seal with the session's key (tests/conftest.py)
    out = {}
    for k in r.scan_iter(match=generation_pattern(model, gen), count=5000):
        if entity_of_key(k) is None:
            continue  # the generation's manifest (core.known_entities), not an entry
        payload = open_sealed(keys, k, r.get(k))
        assert payload is not None, f"{k!r}: not sealed with the configured MAC key"
        d = json.loads(payload)
        d.pop("g")
        out[k.decode().split(":", 4)[4]] = d
    return out


@pytest.fixture(scope="session")
def batch_env(tmp_path_factory: pytest.TempPathFactory, handbook_slice: pd.DataFrame) -> dict[str, str]:
    """A data dir (SQLite registry) with a small trained model active; env for CLI subprocesses."""
    from scoring_service import bootstrap
    from scoring_service.config import Settings
    from scoring_service.training.registration import train_and_register

    data_dir = tmp_path_factory.mktemp("batch-data")
    settings = Settings(data_dir=data_dir)
    registry = bootstrap.registry(settings)
    train_and_register(registry, settings.models_dir, payments=handbook_slice, activate=True, description="batch tests")
    return {"FRAUDSCORE_DATA_DIR": str(data_dir), "OMP_WAIT_POLICY": "PASSIVE", "FRAUDSCORE_LOG_FORMAT": "json"}


@pytest.fixture(scope="session")
def published(kafka_bootstrap: str, handbook_slice: pd.DataFrame) -> str:
    """The slice published once under its own topic prefix; returns the prefix."""
    from scoring_service.adapters.kafka import kafka_io

    prefix = f"fs-it-{uuid.uuid4().hex[:6]}"
    kafka_io.publish_frame(kafka_bootstrap, f"{prefix}.payments", f"{prefix}.labels", handbook_slice)
    return prefix


def settings_for(env: dict[str, str], bootstrap: str | None, prefix: str | None, redis_url: str):  # type: ignore[no-untyped-def]
    from scoring_service.config import Settings

    s = Settings(data_dir=Path(env["FRAUDSCORE_DATA_DIR"]), redis_url=redis_url,
                 kafka_topic_prefix=prefix or "fraudscore")
    return s.model_copy(update={"kafka_bootstrap": bootstrap})


def cli_env(env: dict[str, str], bootstrap: str | None, prefix: str | None, redis_url: str) -> dict[str, str]:
    out = {**os.environ, **env, "REDIS_URL": redis_url}
    out.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    out.pop("FRAUDSCORE_KAFKA_BOOTSTRAP", None)
    if bootstrap:
        out["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    if prefix:
        out["FRAUDSCORE_KAFKA_TOPIC_PREFIX"] = prefix
    return out
