"""The nightly batch against a real Kafka broker and a real Redis (no mocks)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from scoring_service.adapters.kafka import kafka_io
from scoring_service.adapters.redis import cache_writer
from scoring_service.adapters.sql.db import BatchOffset, BatchRun, make_engine
from scoring_service.bootstrap import run_nightly
from scoring_service.core.cache_layout import CacheEntry, active_generation_key, entity_key, generation_pattern
from scoring_service.protos import events_pb2
from tests.integration.batch.conftest import AS_OF, cli_env, generation_contents, settings_for
from tests.servers.common import REPO_ROOT

pytestmark = pytest.mark.integration
AS_OF_S = pd.Timestamp(AS_OF).value / 1e9




def _run_row(settings, run_id: int) -> tuple[BatchRun, list[BatchOffset]]:  # type: ignore[no-untyped-def]
    engine = make_engine(settings.resolved_database_url())
    with Session(engine) as s:
        run = s.get(BatchRun, run_id)
        offs = s.scalars(select(BatchOffset).where(BatchOffset.run_id == run_id)).all()
        s.expunge_all()
        return run, list(offs)


def _cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_nightly_fills_cache_and_is_idempotent(kafka_bootstrap, published, batch_env, redis_url, handbook_slice):
    settings = settings_for(batch_env, kafka_bootstrap, published, redis_url)
    first = run_nightly(settings, as_of=AS_OF_S, show_progress=False)
    r = redis.Redis.from_url(redis_url)
    assert r.get(active_generation_key(first.model_version)).decode() == first.generation
    # every customer with a payment in the 30 days before as_of has an entry in the new generation
    ts = handbook_slice["timestamp"]
    recent = handbook_slice.loc[(ts >= pd.Timestamp(AS_OF) - pd.Timedelta(days=30)) & (ts < pd.Timestamp(AS_OF))]
    customers = set(recent["customer_id"])
    keys = [entity_key(first.model_version, first.generation, "c", c) for c in sorted(customers)]
    values = r.mget(keys)
    assert all(v is not None for v in values)
    entry = CacheEntry.decode(values[0])
    assert entry.generation == first.generation and entry.computed_at == AS_OF_S
    assert 0.0 <= entry.risk_score <= 1.0 and "nb_tx_30d" in entry.state
    assert any(CacheEntry.decode(v).reasons for v in values)
    assert r.ttl(keys[0]) > 0
    assert first.events_consumed > 0 and first.keys_written == first.entities_scored > len(customers)

    run, offsets = _run_row(settings, first.run_id)
    assert run.status == "succeeded" and run.keys_written == first.keys_written
    assert {o.topic for o in offsets} == {settings.topic("payments"), settings.topic("labels")}
    assert sum(o.end_offset - o.start_offset for o in offsets) == run.events_consumed
    assert set(run.details["phases"]) >= {"consume", "features", "score", "write", "switch"}

    # same window again: same contents under a new generation, then switched to it
    second = run_nightly(settings, as_of=AS_OF_S, show_progress=False)
    assert second.generation != first.generation and second.previous_generation == first.generation
    assert (generation_contents(r, first.model_version, first.generation)
            == generation_contents(r, second.model_version, second.generation))


def test_two_workers_split_partitions(kafka_bootstrap, published, batch_env, redis_url):
    settings = settings_for(batch_env, kafka_bootstrap, published, redis_url)
    one = run_nightly(settings, as_of=AS_OF_S, show_progress=False, group_id=f"g1-{uuid.uuid4().hex[:4]}")
    two = run_nightly(settings, as_of=AS_OF_S, show_progress=False, workers=2, group_id=f"g2-{uuid.uuid4().hex[:4]}")
    workers = two.details["workers"]
    assert len(workers) == 2
    parts = [set(w["partitions"]) for w in workers]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(kafka_io.partitions_of(kafka_bootstrap, settings.topic("payments")))
    assert sum(w["events"] for w in workers) == two.events_consumed == one.events_consumed
    r = redis.Redis.from_url(redis_url)
    assert generation_contents(r, one.model_version, one.generation) == generation_contents(r, two.model_version, two.generation)


def test_poison_events_are_dead_lettered_and_counted(kafka_bootstrap, batch_env, redis_url, handbook_slice):
    prefix = f"fs-poison-{uuid.uuid4().hex[:6]}"
    small = handbook_slice.loc[handbook_slice["timestamp"] >= pd.Timestamp(AS_OF) - pd.Timedelta(days=10)]
    kafka_io.publish_frame(kafka_bootstrap, f"{prefix}.payments", f"{prefix}.labels", small)
    t_ms = int((AS_OF_S - 3600) * 1000)
    p = kafka_io.EventProducer(kafka_bootstrap)
    bad = [
        (b"not a protobuf \xff\xff\xff", "undecodable"),
        (events_pb2.PaymentEvent(transaction_id="x1", customer_id="", terminal_id="t", amount=1.0).SerializeToString(), None),
        (events_pb2.PaymentEvent(transaction_id="x2", customer_id="c", terminal_id="t", amount=-5.0).SerializeToString(), None),
        (events_pb2.PaymentEvent(transaction_id="x3", customer_id="c" * 200, terminal_id="t",
                                 amount=float("nan")).SerializeToString(), None),
    ]
    for i, (value, _) in enumerate(bad):
        if i > 0:  # give the proto events a timestamp inside the window
            ev = events_pb2.PaymentEvent()
            ev.ParseFromString(value)
            ev.timestamp.FromSeconds(int(AS_OF_S - 3600))
            value = ev.SerializeToString()
        p.produce(f"{prefix}.payments", value, b"poison", t_ms)
    # a zero amount is valid (card verification): not a dead letter
    zero = events_pb2.PaymentEvent(transaction_id="zero-1", customer_id="0", terminal_id="1", amount=0.0)
    zero.timestamp.FromSeconds(int(AS_OF_S - 3600))
    p.produce(f"{prefix}.payments", zero.SerializeToString(), b"0", t_ms)
    p.flush()

    settings = settings_for(batch_env, kafka_bootstrap, prefix, redis_url)
    result = run_nightly(settings, as_of=AS_OF_S, show_progress=False)
    assert result.status == "succeeded" and result.dead_letters == 4
    run, _ = _run_row(settings, result.run_id)
    assert run.dead_letters == 4 and sum(run.details["dead_letter_reasons"].values()) == 4

    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"dl-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest"})
    c.subscribe([f"{prefix}.dead-letter"])
    letters = []
    deadline = time.monotonic() + 30
    while len(letters) < 4 and time.monotonic() < deadline:
        m = c.poll(1.0)
        if m is not None and m.error() is None:
            dl = events_pb2.DeadLetter()
            dl.ParseFromString(m.value())
            letters.append(dl)
    c.close()
    assert len(letters) == 4
    reasons = " | ".join(d.reason for d in letters)
    assert "undecodable" in reasons and "customer_id" in reasons and "amount" in reasons
    assert all(d.source_topic == f"{prefix}.payments" and d.job == "nightly" for d in letters)


def test_killed_run_leaves_previous_generation_then_rerun_completes(kafka_bootstrap, published, batch_env, redis_url):
    settings = settings_for(batch_env, kafka_bootstrap, published, redis_url)
    base = run_nightly(settings, as_of=AS_OF_S, show_progress=False)
    r = redis.Redis.from_url(redis_url)
    akey = active_generation_key(base.model_version)
    assert r.get(akey).decode() == base.generation

    env = cli_env(batch_env, kafka_bootstrap, published, redis_url)
    # nightly with an injected slow cache writer (200 keys, then a pause): a run to kill part-way through its writes
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.batch.slow_nightly", AS_OF],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        partial = None
        while time.monotonic() < deadline and proc.poll() is None:
            gens = {k.decode().split(":")[3] for k in r.scan_iter(match=f"fs:1:{base.model_version}:*:c:*", count=10000)}
            others = gens - {base.generation}
            if others:
                gen = others.pop()
                if sum(1 for _ in r.scan_iter(match=generation_pattern(base.model_version, gen), count=10000)) >= 400:
                    partial = gen
                    break
            time.sleep(0.2)
        assert partial is not None, f"the run wrote no keys: {proc.communicate(timeout=5) if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert r.get(akey).decode() == base.generation  # the previous generation still serves

    done = _cli("nightly", "--as-of", AS_OF, "--json", env=cli_env(batch_env, kafka_bootstrap, published, redis_url))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and r.get(akey).decode() == out["generation"] != base.generation
    cache_writer.delete_generation(redis_url, base.model_version, partial)


def test_kafka_unreachable_fails_cleanly_without_switching(batch_env, redis_url):
    from tests.servers.common import free_port

    r = redis.Redis.from_url(redis_url)
    before = {k: r.get(k) for k in r.scan_iter(match="fs:1:*:active")}
    env = cli_env(batch_env, f"127.0.0.1:{free_port()}", "fs-nowhere", redis_url)
    done = _cli("nightly", "--as-of", AS_OF, env=env, timeout=120)
    assert done.returncode != 0
    assert "unreachable" in done.stderr.lower() and "Traceback" not in done.stderr
    assert {k: r.get(k) for k in r.scan_iter(match="fs:1:*:active")} == before


def test_events_publish_cli(kafka_bootstrap, batch_env, redis_url, handbook_slice, tmp_path):
    path = tmp_path / "slice.parquet"
    handbook_slice.tail(2000).to_parquet(path)
    prefix = f"fs-pub-{uuid.uuid4().hex[:6]}"
    env = cli_env(batch_env, kafka_bootstrap, None, redis_url)
    done = _cli("events", "publish", "--parquet", str(path), "--topic-prefix", prefix, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["payments"] == 2000 and out["labels"] + out["labels_skipped_future"] == 2000 and out["events_per_s"] > 0
    ends = kafka_io.end_offsets(kafka_bootstrap, f"{prefix}.payments")
    assert sum(ends.values()) == 2000
    missing = _cli("events", "publish", "--parquet", str(tmp_path / "nope.parquet"), env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
