"""Replay (time and partition:offset bounds) through nightly's pipeline; the no-Kafka file source."""

from __future__ import annotations

import pandas as pd
import pytest
import redis

from scoring_service.adapters.kafka import kafka_io
from scoring_service.batch.pipeline import BatchError
from scoring_service.batch.replay import card_precision_per_day, parse_bound, summarise
from scoring_service.bootstrap import rebuild_cache, replay_cache, run_nightly
from scoring_service.core.cache_layout import active_generation_key
from tests.integration.batch.conftest import AS_OF, generation_contents, settings_for

pytestmark = pytest.mark.integration
AS_OF_S = pd.Timestamp(AS_OF).value / 1e9




def test_replay_by_time_and_by_offsets(kafka_bootstrap, published, batch_env, redis_url):
    settings = settings_for(batch_env, kafka_bootstrap, published, redis_url)
    start = "2018-07-01"
    by_time = replay_cache(settings, start, AS_OF, show_progress=False)
    assert by_time.job == "replay" and by_time.status == "succeeded" and by_time.keys_written > 0
    r = redis.Redis.from_url(redis_url)
    assert r.get(active_generation_key(by_time.model_version)).decode() == by_time.generation

    # offsets: from the start of every partition to the as_of offsets (same payments)
    ranges = kafka_io.resolve_window(kafka_bootstrap, settings.topic("payments"), None, int(AS_OF_S * 1000))
    to = ",".join(f"{x.partition}:{x.end}" for x in ranges)
    by_offsets = replay_cache(settings, None, to, show_progress=False)
    assert by_offsets.status == "succeeded" and by_offsets.keys_written == by_time.keys_written


def test_file_source_and_in_memory_rebuild_match(batch_env, redis_url, handbook_slice, tmp_path):
    path = tmp_path / "events.parquet"
    handbook_slice.to_parquet(path)
    settings = settings_for(batch_env, None, None, redis_url)
    from_file = run_nightly(settings, as_of=AS_OF_S, source=path, show_progress=False)
    in_memory = rebuild_cache(handbook_slice, AS_OF, settings)
    r = redis.Redis.from_url(redis_url)
    assert from_file.keys_written > 0
    assert (generation_contents(r, from_file.model_version, from_file.generation)
            == generation_contents(r, in_memory.model_version, in_memory.generation))
    with pytest.raises(BatchError, match="no event source"):
        run_nightly(settings, as_of=AS_OF_S, show_progress=False)


def test_bounds_and_served_metrics():
    assert parse_bound("0:10,3:20").offsets == {0: 10, 3: 20}
    assert parse_bound("2018-08-01").time == pd.Timestamp("2018-08-01").value / 1e9
    with pytest.raises(BatchError):
        parse_bound("yesterday-ish")
    payments = pd.DataFrame({
        "transaction_id": list("abcd"), "customer_id": ["1", "2", "1", "3"],
        "timestamp": pd.to_datetime(["2018-08-01 01:00", "2018-08-01 02:00", "2018-08-02 01:00", "2018-08-02 02:00"]),
        "is_fraud": [1, 0, 0, 1],
    })
    answers = [{"risk_score": s, "source": src, "latency_ms": 1.0, "client_latency_ms": 2.0}
               for s, src in [(0.9, "CACHE"), (0.1, "MODEL"), (0.2, "CACHE"), (0.8, "CACHE")]]
    rep = summarise(payments, answers)
    assert rep["average_precision"] == 1.0 and rep["cache_hit_ratio"] == 0.75 and rep["errors"] == 0
    per_day = card_precision_per_day(payments.assign(score=[a["risk_score"] for a in answers]), k=1)
    assert per_day == {"2018-08-01": 1.0, "2018-08-02": 1.0}
