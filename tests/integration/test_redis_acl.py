"""The Redis that ships (deploy/redis: start.sh, redis.conf, users.acl), started as compose and
Kubernetes start it, with each client logged in as its own user (docs/security.md, "Redis users").

As ``scorer``, everything the request path does succeeds (the start check, the generation and
its entries read through ``EntityCache``, a new card's write-back, the intraday record, the rate
limiter's script) and nothing is refused on the way (Redis' ACL LOG stays empty), while deleting
or rewriting what the batch wrote (its card and terminal entries, the active pointer, a
generation's manifest) is refused with NOPERM, entity ids with ':' included. As ``nightly``, a real generation
is written and switched, and the online state is out of reach. At maxmemory the shipped policy
evicts a superseded generation before the active one, and never the pointer.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from scoring_service import bootstrap
from scoring_service.adapters.redis.cache_writer import entry_items
from scoring_service.adapters.redis.entity_cache import CircuitBreaker, EntityCache
from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.redis.resp import RedisRefused, check_connection
from scoring_service.batch.pipeline import new_generation
from scoring_service.config import Settings
from scoring_service.core.cache_layout import (
    BATCH,
    CUSTOMER,
    ONLINE,
    ONLINE_GENERATION,
    TERMINAL,
    CacheEntry,
    EntryOrigin,
    active_generation_key,
    entity_key,
    intraday_key,
)
from scoring_service.core.integrity import MacKeys
from tests.servers.common import REPO_ROOT, free_port, require_binary, stop_process, wait_for_port

START = REPO_ROOT / "deploy" / "redis" / "start.sh"
MAC = MacKeys([("k1", b"integration-acl-mac-secret-01")])
USERS = ("admin", "scorer", "nightly")


@dataclass
class ShippedRedis:
    """redis-server started by deploy/redis/start.sh with the passwords of this test run."""

    port: int
    passwords: dict[str, str]
    proc: subprocess.Popen
    folder: Path  # its ACL file, and the batch jobs' data directory (their log-id key)

    def url(self, user: str | None, password: str | None = None) -> str:
        secret = self.passwords.get(user or "", "") if password is None else password
        return f"redis://{quote(user or '', safe='')}:{quote(secret, safe='')}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=10)

    def refused(self) -> list[object]:
        """Commands and keys refused since the last reset (ACL LOG; failed logins left out)."""
        return [e for e in self.client("admin").acl_log() if e["reason"] != "auth"]


def _start(folder: Path, maxmemory: str) -> ShippedRedis:
    require_binary("redis-server", "run `make deps` (apt-get install -y redis-server)")
    passwords = {user: secrets.token_hex(16) for user in USERS}
    env = {**os.environ, "REDIS_ACL_DIR": str(folder), "REDIS_MAXMEMORY": maxmemory,
           **{f"REDIS_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()}}
    port = free_port()
    # start.sh ends in `exec redis-server`: the process started here is the server itself
    proc = subprocess.Popen(["sh", str(START), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--loglevel", "warning"], env=env, stdout=subprocess.DEVNULL)
    wait_for_port(port, 10, proc)
    return ShippedRedis(port, passwords, proc, folder)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedRedis]:
    server = _start(tmp_path_factory.mktemp("redis-acl"), "256mb")
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model versions as the registry names them (the ACL's patterns depend on their shape)."""
    registry = bootstrap.registry(Settings(data_dir=tmp_path_factory.mktemp("registry")))
    return {prefix: registry.next_version(prefix) for prefix in ("xgb", "lgbm")}


def _entry(version: str, score: float, generation: str = ONLINE_GENERATION, origin: EntryOrigin = BATCH) -> CacheEntry:
    return CacheEntry(risk_score=score, state={"n_30d": 3.0}, model_version=version, computed_at=time.time(),
                      reasons=[("AMOUNT_HIGH", "amount", 0.5)], generation=generation, origin=origin)


def _nightly_run(server: ShippedRedis, version: str, run_id: int, ttl_s: int = 600,
                 customers: dict[str, float] | None = None, terminals: dict[str, float] | None = None
                 ) -> tuple[str, str | None]:
    """A batch run's cache step as the nightly does it (as ``nightly``): write a generation, then switch."""
    generation = new_generation(time.time(), run_id)
    customers = {"c-known": 0.97, "x:0:c:y": 0.9} if customers is None else customers
    terminals = {"t-known": 0.12, "a:c:b": 0.2} if terminals is None else terminals
    items = entry_items(version, generation, {c: _entry(version, s, generation) for c, s in customers.items()},
                        {t: _entry(version, s, generation) for t, s in terminals.items()})
    settings = Settings(data_dir=server.folder, redis_url=server.url("nightly"), cache_ttl_s=ttl_s,
                        cache_mac_keys="k1:integration-acl-mac-secret-01")
    writer = bootstrap.batch_cache_writer(settings, connections=1)  # checks the login first, as the batch jobs do
    writer.write_items(items)
    return generation, writer.switch_generation(version, generation, [items[0][0], items[-1][0]])


@pytest.fixture(scope="module")
def served(shipped: ShippedRedis, versions: dict[str, str]) -> dict[str, str]:
    """The active generation of each model version, written and switched by the nightly user."""
    return {version: _nightly_run(shipped, version, run_id=41)[0] for version in versions.values()}


def _refused(call: Callable[..., object], *args: object) -> str:
    """Redis' refusal of ``call(*args)`` (NoPermissionError, or a script's error naming it)."""
    with pytest.raises(ResponseError) as refused:
        call(*args)
    return str(refused.value)


# ------------------------------------------------------------------------------------ logins
def test_only_named_users_log_in_and_the_acl_shows_no_password(shipped: ShippedRedis) -> None:
    with pytest.raises(RedisRefused, match="NOAUTH"):
        check_connection(f"redis://127.0.0.1:{shipped.port}/0")  # no AUTH: the default user is off
    with pytest.raises(RedisRefused, match="WRONGPASS"):
        check_connection(shipped.url(None, shipped.passwords["admin"]))  # a password alone is the default user's
    with pytest.raises(RedisRefused, match="WRONGPASS"):
        check_connection(shipped.url("scorer", shipped.passwords["nightly"]))
    for user in ("scorer", "nightly"):
        check_connection(shipped.url(user))  # what `serve` and the batch jobs check at start
    listed = "\n".join(str(line) for line in shipped.client("admin").acl_list())
    assert not any(pw in listed for pw in shipped.passwords.values())
    assert listed.count(" #") == 3  # admin, scorer, nightly: by their SHA-256 only


def test_the_renderer_refuses_a_shared_or_missing_password(tmp_path: Path) -> None:
    render = str(REPO_ROOT / "deploy" / "redis" / "render-acl.sh")
    same = {**os.environ, "REDIS_ADMIN_PASSWORD": "x1", "REDIS_SCORER_PASSWORD": "x1", "REDIS_NIGHTLY_PASSWORD": "x2"}
    proc = subprocess.run(["sh", render, str(tmp_path / "a.acl")], env=same, capture_output=True, text=True)
    assert proc.returncode != 0 and "must all differ" in proc.stderr
    missing = {k: v for k, v in same.items() if k != "REDIS_NIGHTLY_PASSWORD"}
    proc = subprocess.run(["sh", render, str(tmp_path / "b.acl")], env=missing, capture_output=True, text=True)
    assert proc.returncode != 0 and "REDIS_NIGHTLY_PASSWORD" in proc.stderr
    assert not (tmp_path / "a.acl").exists() and not (tmp_path / "b.acl").exists()


# ------------------------------------------------------------------------------------ the scorer
def test_the_scorer_does_its_whole_job_and_nothing_is_refused(shipped: ShippedRedis, served: dict[str, str]) -> None:
    shipped.client("admin").acl_log_reset()
    url = shipped.url("scorer")

    async def run(version: str) -> None:
        cache = EntityCache(url, timeout_s=0.5, ttl_s=600, breaker=CircuitBreaker(5, 1.0), mac=MAC)
        try:
            assert await cache.refresh_generation(version) == served[version]
            known = await cache.read(version, "c-known", "t-known", 0.5)
            assert known.customer is not None and known.customer.risk_score == 0.97
            assert known.terminal is not None and known.terminal.risk_score == 0.12
            cache.write_back(version, [(CUSTOMER, "c-new:1", _entry(version, 0.02, served[version], ONLINE))])
            cache.record_payment("c-new:1", time.time(), 12.5, "tx-1")
            await cache.drain()
            cache.record_payment("c-new:1", time.time(), 30.0, "tx-2", trim=True)  # ZREMRANGEBY* as well
            await cache.drain()
            new = await cache.read(version, "c-new:1", "t-known", 0.5)
            assert new.customer is not None and new.customer.origin == ONLINE
            assert [p.transaction_id for p in new.intraday] == ["tx-1", "tx-2"]
            assert cache.breaker.consecutive_failures == 0
        finally:
            await cache.close()

    async def rate_limit() -> list[bool]:
        limiter = RateLimiter(url, timeout_s=0.5)
        try:  # the first call loads the script (EVALSHA: NOSCRIPT, then EVAL), the second runs it by its hash
            return [(await limiter.take(7, 10.0, 5)).shared for _ in range(2)]
        finally:
            await limiter.close()

    for version in served:
        asyncio.run(run(version))
    assert asyncio.run(rate_limit()) == [True, True]  # decided by the shared bucket, not the per-process fallback
    assert shipped.refused() == []


def test_the_scorer_cannot_delete_or_rewrite_what_the_batch_wrote(shipped: ShippedRedis, served: dict[str, str]) -> None:
    scorer = shipped.client("scorer")
    for version, generation in served.items():
        batch_card = entity_key(version, generation, CUSTOMER, "c-known")
        batch_terminal = entity_key(version, generation, TERMINAL, "t-known")
        pointer = active_generation_key(version)
        manifest = f"fs:1:{version}:{generation}:manifest"
        for key in (batch_card, batch_terminal, pointer, manifest):
            assert "no permissions to run the 'del' command" in _refused(scorer.delete, key)
            assert "unlink" in _refused(scorer.unlink, key)
        for key in (batch_card, batch_terminal, pointer, manifest):
            assert "no permissions to access one of the keys" in _refused(scorer.set, key, b"forged")
            assert "no permissions to access one of the keys" in _refused(scorer.expire, key, 1)
        # ids with ':' cannot stretch a pattern over a batch terminal's key or the online generation's terminal
        for key in (entity_key(version, generation, TERMINAL, "a:c:b"), entity_key(version, generation, TERMINAL, "0:c:x"),
                    entity_key(version, ONLINE_GENERATION, TERMINAL, "x:0:c:y")):
            assert "no permissions to access one of the keys" in _refused(scorer.set, key, b"forged")
        # nor can a script do what the user may not
        assert "no permissions to access" in _refused(scorer.eval, "return redis.call('DEL', KEYS[1])", 1, batch_card)
        online_card = entity_key(version, ONLINE_GENERATION, CUSTOMER, "c-new")  # one it may write, not delete
        assert "can't run this command" in _refused(scorer.eval, "return redis.call('DEL', KEYS[1])", 1, online_card)
        assert "can't access" in _refused(scorer.eval, "return redis.call('SET', ARGV[1], 'g')", 0, pointer)
        assert scorer.get(pointer) == served[version].encode()
        assert shipped.client("admin").ttl(pointer) == -1  # the pointer has no TTL: volatile-ttl never evicts it
    for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("SCAN", "0"), ("CONFIG", "SET", "maxmemory", "1"),
                    ("RENAME", "fs:rl:7", "fs:rl:8"), ("SWAPDB", "0", "1"), ("ACL", "SETUSER", "scorer", "+@all", "~*"),
                    ("SCRIPT", "FLUSH"), ("CLIENT", "LIST")):
        assert "no permissions to run" in _refused(scorer.execute_command, *command), command


@pytest.mark.parametrize("run_id", [1, 12, 123, 1_234, 12_345, 123_456, 1_234_567, 12_345_678])
def test_the_scorer_writes_only_the_online_generation_never_a_batch_card_entry(
        shipped: ShippedRedis, versions: dict[str, str], run_id: int) -> None:
    """Write-backs go under generation "0" (EntityCache.write_back): a batch generation's card entry,
    of any run id, is out of the scorer's reach, an id with ':' included."""
    scorer = shipped.client("scorer")
    for version in versions.values():
        generation = new_generation(time.time(), run_id)
        for card in ("c-new", "x:0:c:y"):
            assert "no permissions to access one of the keys" in _refused(
                scorer.set, entity_key(version, generation, CUSTOMER, card), b"v")
            assert "no permissions to access one of the keys" in _refused(
                scorer.expire, entity_key(version, generation, CUSTOMER, card), 1)
        assert scorer.set(entity_key(version, ONLINE_GENERATION, CUSTOMER, "c-new"), b"v", ex=60, nx=True) in (True, None)
        with pytest.raises(NoPermissionError):
            scorer.set(entity_key(version, ONLINE_GENERATION, TERMINAL, "t-new"), b"v", ex=60)



# ------------------------------------------------------------------------------------ the batch jobs
def test_the_nightly_switches_generations_but_cannot_touch_the_online_state(shipped: ShippedRedis,
                                                                           versions: dict[str, str]) -> None:
    version = versions["lgbm"]
    first, _ = _nightly_run(shipped, version, run_id=7)
    second, previous = _nightly_run(shipped, version, run_id=8)
    assert previous == first
    admin = shipped.client("admin")
    assert admin.get(active_generation_key(version)) == second.encode()
    assert admin.exists(entity_key(version, second, CUSTOMER, "c-known"), entity_key(version, second, TERMINAL, "t-known")) == 2
    nightly = shipped.client("nightly")
    for key in (entity_key(version, ONLINE_GENERATION, CUSTOMER, "c-new"), intraday_key("c-known"), "fs:rl:7"):
        assert "no permissions to access one of the keys" in _refused(nightly.set, key, b"x")
    assert "'zadd' command" in _refused(nightly.zadd, intraday_key("c-known"), {"1.0|tx": 1.0})
    assert "'del' command" in _refused(nightly.delete, entity_key(version, second, CUSTOMER, "c-known"))
    assert "'flushall' command" in _refused(nightly.flushall)


# ------------------------------------------------------------------------------------ memory
def test_at_maxmemory_a_superseded_generation_goes_before_the_active_one_and_never_the_pointer(
        tmp_path: Path, versions: dict[str, str]) -> None:
    server = _start(tmp_path, "1gb")
    try:
        version, n = versions["xgb"], 3000
        admin = server.client("admin")

        def run(run_id: int, ttl_s: int) -> str:  # ttl: the generation's age (older runs expire sooner)
            ids = {f"c{run_id}-{i:05d}": 0.5 for i in range(n)}
            return _nightly_run(server, version, run_id, ttl_s, customers=ids, terminals={})[0]

        def used() -> int:
            return int(admin.info("memory")["used_memory"])

        before = used()
        superseded = run(1, 86_400)
        generation_bytes = used() - before
        active = run(2, 2 * 86_400)
        # room for half a generation more: writing the next one must evict about half a generation
        admin.config_set("maxmemory", used() + generation_bytes // 2)
        new = run(3, 3 * 86_400)
        pointer = active_generation_key(version)
        assert admin.get(pointer) == new.encode() and admin.ttl(pointer) == -1  # switched; the pointer kept, no TTL

        def left(generation: str, run_id: int) -> int:
            keys = [entity_key(version, generation, CUSTOMER, f"c{run_id}-{i:05d}") for i in range(n)]
            return sum(admin.exists(*keys[i:i + 500]) for i in range(0, n, 500))

        kept = {"superseded": left(superseded, 1), "previous": left(active, 2), "new": left(new, 3)}
        evicted = 3 * n - sum(kept.values())
        assert evicted > n // 3, kept
        assert kept["new"] == n, kept
        # nearly all of it fell on the oldest generation (Redis samples keys: not always exactly the oldest)
        assert n - kept["superseded"] >= 0.9 * evicted, kept
    finally:
        stop_process(server.proc)
