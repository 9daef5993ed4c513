"""Faults of the service's dependencies and of the service itself, against real processes (issue 13).

What a caller sees for each fault is in ``docs/faults.md``. Not repeated here:
``test_resilience.py`` (a frozen Redis and a stopped one: answers within the budget, the breaker
opens), ``test_lifecycle.py`` (SIGTERM under load, workers). Here:

* Redis behind a delaying TCP proxy (``tests/servers/delay_proxy.py``): slowed past
  ``FRAUDSCORE_REDIS_TIMEOUT_MS``, black-holed, reset; then healthy again.
* Redis stopped (SIGTERM) and killed (SIGKILL), then restarted on its data: the breaker closes and
  CACHE answers come back.
* The database: unreachable at start (one clear line, exit 1), stopped while serving (scoring goes
  on, the registry poll counts its failures and picks up again when the database is back).
* The service SIGKILLed under light load and restarted: callers see UNAVAILABLE in the gap, then
  the same model and CACHE answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis

from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
from scoring_service.adapters.sql.registry import ModelRecord
from scoring_service.bootstrap import registry as open_registry
from scoring_service.config import Settings
from scoring_service.core.cache_layout import CUSTOMER, CacheEntry, active_generation_key, entity_key
from scoring_service.core.integrity import MacKeys
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from tests.e2e.test_score_grpc import new_customer, request, usual_state
from tests.servers.common import REPO_ROOT, free_port, stop_process, wait_for_port
from tests.servers.delay_proxy import DelayProxy
from tests.servers.postgres import PostgresServer, _pg_bin
from tests.servers.redis import TEST_CACHE_MAC_KEYS, RedisServer, sealed_item
from tests.servers.scorer import ScorerProcess, serve_command

pytestmark = pytest.mark.e2e

GENERATION = "g-faults"
# The queueing bound off: on a shared CI machine a late event loop sheds calls with RESOURCE_EXHAUSTED
# (test_overload.py's subject); these tests are about what a fault of a dependency does to the answers.
NO_SHEDDING = {"FRAUDSCORE_MAX_QUEUE_MS": "0"}
# Short breaker period so that recovery is quick; the Redis timeout at its production default.
FAULT_ENV = {"FRAUDSCORE_REDIS_TIMEOUT_MS": "15", "FRAUDSCORE_BREAKER_RESET_S": "0.5", "FRAUDSCORE_BUDGET_MS": "100",
             **NO_SHEDDING}
# The other tests: a generous Redis timeout (tests/e2e/conftest.py says why).
CALM_ENV = {"FRAUDSCORE_REDIS_TIMEOUT_MS": "80", **NO_SHEDDING}
# Reconnect quickly once a server is back, so that a test waits on the server, not on the client's backoff.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 300)]


def seed_cached_card(redis_url: str, model_version: str, generation: str | None = None) -> str:
    """A card a batch run knows: with ``generation``, written and switched to by the batch jobs' writer
    (the entry, the generation's manifest, the pointer); else an entry in the active generation."""
    customer = new_customer()
    if generation is not None:
        entry = CacheEntry(0.01, usual_state(20, 25.0), model_version, 1_700_000_000.0, [("LOW_RISK", "f", -1.0)],
                           generation)
        key = entity_key(model_version, generation, CUSTOMER, customer).encode()
        writer = RedisCacheWriter(redis_url, ttl_s=3600, connections=1, mac=MacKeys.parse(TEST_CACHE_MAC_KEYS))
        writer.write_items([(key, entry.encode())])
        writer.switch_generation(model_version, generation, [key])
        return customer
    client = redis.Redis.from_url(redis_url)
    gen = (client.get(active_generation_key(model_version)) or b"0").decode()
    entry = CacheEntry(0.01, usual_state(20, 25.0), model_version, 1_700_000_000.0, [("LOW_RISK", "f", -1.0)], gen)
    client.set(*sealed_item(entity_key(model_version, gen, CUSTOMER, customer), entry))
    client.close()
    return customer


def score(stub: scoring_pb2_grpc.FraudScoringStub, customer: str, timeout: float = 2.0
          ) -> tuple[str, scoring_pb2.ScoreResponse | None]:
    """(status code name, the answer when OK)."""
    try:
        return "OK", stub.Score(request(customer), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code().name, None


def wait_for_cache(stub: scoring_pb2_grpc.FraudScoringStub, customer: str, timeout: float = 20.0
                   ) -> scoring_pb2.ScoreResponse | None:
    """The first CACHE answer for ``customer`` within ``timeout`` seconds (None if none came)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, answer = score(stub, customer)
        if answer is not None and answer.source == scoring_pb2.CACHE:
            return answer
        time.sleep(0.1)
    return None


def figures(answers: list[scoring_pb2.ScoreResponse]) -> str:
    lat = sorted(a.latency_ms for a in answers)
    sources = Counter(scoring_pb2.Source.Name(a.source) for a in answers)
    return f"n={len(lat)} server latency_ms p50={lat[len(lat) // 2]:.1f} max={lat[-1]:.1f} sources={dict(sources)}"


# ------------------------------------------------------------------------------------ Redis through the proxy
@pytest.fixture(scope="module")
def proxied(model_data_dir: Path, active_model: ModelRecord) -> Iterator[tuple[DelayProxy, ScorerProcess, str]]:
    server = RedisServer().start()
    proxy = DelayProxy(server.port).start()
    cached = seed_cached_card(server.url, active_model.version, GENERATION)
    scorer = ScorerProcess(model_data_dir, proxy.url, env=FAULT_ENV)
    try:
        yield proxy, scorer.start(), cached
    finally:  # a scorer that never got SERVING is stopped too
        scorer.stop()
        proxy.stop()
        server.stop()


def test_redis_slowed_black_holed_or_reset_every_call_still_answers_and_the_breaker_opens_then_closes(proxied):
    proxy, scorer, cached = proxied
    with grpc.insecure_channel(scorer.address) as ch:
        stub = scorer.stub(ch)
        code, healthy = score(stub, cached)
        assert code == "OK" and healthy is not None and healthy.source == scoring_pb2.CACHE and not healthy.degraded

        for mode in ("delay", "blackhole", "reset"):
            # delay: 50 ms each way, a round trip of 100 ms against a 15 ms Redis timeout
            proxy.set_mode(mode, delay_s=0.05)
            results = []
            for _ in range(12):  # over 0.7 s, past the breaker's 0.5 s reset: its trial calls meet this mode too
                results += [score(stub, c) for c in (cached, new_customer())]
                time.sleep(0.06)
            codes = Counter(code for code, _ in results)
            assert codes == {"OK": len(results)}, (mode, codes)  # never UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED
            answers = [a for _, a in results if a is not None]
            assert all(a.degraded and a.source in (scoring_pb2.MODEL, scoring_pb2.FALLBACK) for a in answers), mode
            print(f"redis {mode}: {figures(answers)}")  # for docs/faults.md; the budget at p99 is bench/redis_faults.py
        assert scorer.log_events("redis.breaker_open")

        proxy.set_mode("pass")
        back = wait_for_cache(stub, cached)
        assert back is not None and not back.degraded  # the breaker's trial call closed it
    assert scorer.log_events("redis.breaker_closed")
    assert proxy.counts["resets"] > 0 and proxy.counts["chunks_dropped"] > 0


# ------------------------------------------------------------------------------------ Redis stopped, killed, restarted
@dataclass
class DurableRedis(RedisServer):
    """A Redis with an append-only file (fsync always) that can be stopped or killed and restarted on its data."""

    extra_args: tuple[str, ...] = ("--appendonly", "yes", "--appendfsync", "always")
    restarts: int = field(default=0)

    def halt(self, sig: int) -> None:
        assert self.proc is not None
        if sig == signal.SIGKILL:
            self.proc.kill()
            self.proc.wait(10)
        else:
            stop_process(self.proc)

    def restart(self) -> None:
        assert self._dir is not None and self.proc is not None and self.proc.poll() is not None
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--dir", self._dir.name,
             "--loglevel", "warning", *self.extra_args], stdout=subprocess.DEVNULL)
        wait_for_port(self.port, 10, self.proc)
        self.restarts += 1


@pytest.fixture(scope="module")
def durable(model_data_dir: Path, active_model: ModelRecord) -> Iterator[tuple[DurableRedis, ScorerProcess, str]]:
    server = DurableRedis().start()
    cached = seed_cached_card(server.url, active_model.version, GENERATION)
    scorer = ScorerProcess(model_data_dir, server.url, env=FAULT_ENV)
    try:
        yield server, scorer.start(), cached
    finally:
        scorer.stop()
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_redis_stopped_or_killed_answers_go_on_and_cache_answers_come_back_after_its_restart(durable, sig):
    server, scorer, cached = durable
    closed_before = len(scorer.log_events("redis.breaker_closed"))
    with grpc.insecure_channel(scorer.address) as ch:
        stub = scorer.stub(ch)
        assert wait_for_cache(stub, cached) is not None

        server.halt(sig)
        results = [score(stub, c) for _ in range(10) for c in (cached, new_customer())]
        assert Counter(code for code, _ in results) == {"OK": len(results)}
        answers = [a for _, a in results if a is not None]
        assert all(a.degraded and a.source in (scoring_pb2.MODEL, scoring_pb2.FALLBACK) for a in answers)
        print(f"redis {signal.Signals(sig).name}: {figures(answers)}")

        server.restart()
        restarted = time.monotonic()
        back = wait_for_cache(stub, cached)
        assert back is not None and not back.degraded and back.risk_score == pytest.approx(0.01)
        print(f"redis {signal.Signals(sig).name}: CACHE again {time.monotonic() - restarted:.2f} s after the restart")
    assert len(scorer.log_events("redis.breaker_closed")) > closed_before


# ------------------------------------------------------------------------------------ the database
def test_serve_with_the_database_unreachable_exits_with_one_line_naming_it(tmp_path: Path, redis_url: str) -> None:
    port = free_port()  # nothing listens there: a stopped database
    env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(tmp_path), "REDIS_URL": redis_url, "FRAUDSCORE_LOG_FORMAT": "json",
           "FRAUDSCORE_DATABASE_URL": f"postgresql+psycopg://fraudscore:s3cret@127.0.0.1:{port}/fraudscore"}
    done = subprocess.run(serve_command(f"127.0.0.1:{free_port()}"), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"database postgresql+psycopg://fraudscore:***@127.0.0.1:{port}/fraudscore is unreachable" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout and "s3cret" not in done.stderr + done.stdout


def _pg_ctl(server: PostgresServer, *args: str) -> None:
    subprocess.run(server._as_postgres(_pg_bin("pg_ctl"), "-D", os.path.join(server.root, "data"), *args),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_database_stopped_while_serving_scoring_goes_on_and_the_registry_poll_resumes(
        active_model: ModelRecord, redis_url: str, tmp_path: Path) -> None:
    pg = PostgresServer().start()
    try:
        registry = open_registry(Settings(data_dir=tmp_path, database_url=pg.url))
        fields = dict(framework=active_model.framework, sha256=active_model.sha256,
                      feature_names=active_model.feature_names, thresholds=active_model.thresholds,
                      policy=active_model.policy)
        registry.register(version=active_model.version, artifact_path=active_model.artifact_path, activate=True, **fields)
        metrics = free_port()
        env = {"FRAUDSCORE_DATABASE_URL": pg.url, "FRAUDSCORE_REGISTRY_POLL_S": "0.3",
               "FRAUDSCORE_METRICS_PORT": str(metrics), **CALM_ENV}
        scorer = ScorerProcess(tmp_path, redis_url, env=env)
        try:
            scorer.start()
            with grpc.insecure_channel(scorer.address) as ch:
                stub = scorer.stub(ch)
                assert score(stub, new_customer())[0] == "OK"

                _pg_ctl(pg, "-m", "fast", "-w", "stop")
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and _metric(metrics, "fraudscore_registry_poll_failures_total") < 3:
                    time.sleep(0.2)
                results = [score(stub, new_customer()) for _ in range(10)]
                assert Counter(code for code, _ in results) == {"OK": 10}
                assert all(a is not None and a.model_version == active_model.version for _, a in results)
                assert _metric(metrics, "fraudscore_registry_poll_failures_total") >= 3
                failures = scorer.log_events("model.watch_failed")
                assert failures and "unreachable" in failures[-1]["error"] and "exception" not in failures[-1]

                _pg_ctl(pg, "-o", f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.root} -c fsync=off",
                        "-l", os.path.join(pg.root, "log"), "-w", "start")
                artifact = tmp_path / f"again-{Path(active_model.artifact_path).name}"
                shutil.copy(active_model.artifact_path, artifact)
                again = registry.register(version=f"again-{uuid.uuid4().hex[:6]}", artifact_path=artifact, activate=True,
                                          **fields)
                deadline = time.monotonic() + 20
                answer = None
                while time.monotonic() < deadline:
                    answer = score(stub, new_customer())[1]
                    if answer is not None and answer.model_version == again.version:
                        break
                    time.sleep(0.2)
                assert answer is not None and answer.model_version == again.version  # the poll picked up again
            assert scorer.proc is not None and scorer.proc.poll() is None  # it never crashed
        finally:
            scorer.stop()
    finally:
        pg.stop()


# ------------------------------------------------------------------------------------ the service killed
@dataclass
class LightLoad:
    """One caller in a thread: a payment every 20 ms (the cached card and new cards in turn), outcomes recorded."""

    address: str
    cached: str
    outcomes: list[tuple[float, str, str, scoring_pb2.ScoreResponse | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as ch:
            stub = scoring_pb2_grpc.FraudScoringStub(ch)
            i = 0
            while not self.stop.is_set():
                customer = self.cached if i % 2 else new_customer()
                code, answer = score(stub, customer, timeout=1.0)
                self.outcomes.append((time.monotonic(), customer, code, answer))
                i += 1
                time.sleep(0.02)

    def ok_since(self, t: float) -> int:
        return sum(1 for at, _, code, _ in self.outcomes if at >= t and code == "OK")


def test_sigkill_and_restart_under_light_load_callers_see_unavailable_then_the_same_model_and_cache(
        model_data_dir: Path, active_model: ModelRecord, redis_url: str) -> None:
    cached = seed_cached_card(redis_url, active_model.version)
    first = ScorerProcess(model_data_dir, redis_url, env=CALM_ENV)
    second = ScorerProcess(model_data_dir, redis_url, env=CALM_ENV, port=first.port)
    load = LightLoad(first.address, cached)
    caller = threading.Thread(target=load.run, daemon=True)
    try:
        first.start()
        caller.start()
        deadline = time.monotonic() + 30
        while load.ok_since(0) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        assert first.wait_exit(10) == -signal.SIGKILL
        killed = time.monotonic()
        second.start(timeout=300)  # loading the model takes most of it
        restarted = time.monotonic()
        deadline = restarted + 30
        while load.ok_since(restarted) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        load.stop.set()
        if caller.is_alive():
            caller.join(10)
        first.stop()
        second.stop()
    before = [a for at, _, _, a in load.outcomes if at < killed and a is not None]
    back = min(at for at, _, code, _ in load.outcomes if at >= killed and code == "OK")  # the first answer again
    gap = Counter(code for at, _, code, _ in load.outcomes if killed <= at < back)
    after = [a for at, _, _, a in load.outcomes if at >= back and a is not None]
    codes = Counter(code for _, _, code, _ in load.outcomes)
    print(f"SIGKILL: before {len(before)} OK; {back - killed:.1f} s without an answer {dict(gap)} "
          f"(restart took {restarted - killed:.1f} s); after {len(after)} OK; all {dict(codes)}")
    # Never CANCELLED, INTERNAL or UNKNOWN. DEADLINE_EXCEEDED: a caller's 1 s deadline missed while a loaded CI
    # machine runs the restart next to the answers (seen once in ~3,000 calls at a load average of 30), not the gap.
    assert set(codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    assert set(gap) == {"UNAVAILABLE"}  # the gap: every call refused at once, none left hanging
    assert len(after) >= 20 and {a.model_version for a in before + after} == {active_model.version}
    cached_after = [a for at, customer, _, a in load.outcomes if at >= back and customer == cached and a]
    assert cached_after and all(a.source == scoring_pb2.CACHE for a in cached_after)  # the cache outlived the kill
