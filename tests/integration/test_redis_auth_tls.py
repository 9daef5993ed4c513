"""Redis with an ACL user and a password, and Redis with TLS (a CA of the test's own, client
certificates required): every client of the service (the request path's RESP client, the entity
cache, the batch writer) connects, authenticates on every connection, and a wrong password or an
untrusted certificate is refused with a message naming Redis, never the password."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scoring_service import bootstrap
from scoring_service.adapters.redis.cache_writer import RedisCacheWriter
from scoring_service.adapters.redis.entity_cache import CUSTOMER, CacheEntry, CircuitBreaker, EntityCache
from scoring_service.adapters.redis.resp import PipelinedRedis, RedisRefused, check_connection
from scoring_service.batch.pipeline import BatchError
from scoring_service.config import Settings
from scoring_service.core.cache_layout import entity_key, open_sealed
from scoring_service.core.integrity import MacKeys
from tests.servers.common import REPO_ROOT, free_port
from tests.servers.redis import RedisServer, TlsFiles, make_tls_files

USER, PASSWORD = "scorer", "acl-pw-5f1c9e"
TLS_PASSWORD = "tls-pw-77ab01"
MAC = MacKeys([("k1", b"integration-mac-secret-0001")])
VERSION = "xgb-auth-tls"


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    # The default user is off: only the ACL user may connect.
    server = RedisServer(extra_args=("--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all",
                                     "--user", "default", "off")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tls=tls_files, extra_args=("--requirepass", TLS_PASSWORD)).start()
    yield server
    server.stop()


def _entry(score: float) -> CacheEntry:
    return CacheEntry(risk_score=score, state={"n": 1.0}, model_version=VERSION, computed_at=time.time())


def _round_trip(url: str) -> tuple[object, CacheEntry | None, CacheEntry | None]:
    """SET/GET through the RESP client, an entity-cache write-back read back, a batch-written entry read back."""
    batch_key = entity_key(VERSION, "0", CUSTOMER, "c-batch")
    RedisCacheWriter(url, ttl_s=600, connections=1, mac=MAC).write_items([(batch_key.encode(), _entry(0.7).encode())])

    async def run() -> tuple[object, CacheEntry | None, CacheEntry | None]:
        r = PipelinedRedis(url)
        await r.execute("SET", "auth:k", "v")
        got = await r.execute("GET", "auth:k")
        await r.aclose()
        cache = EntityCache(url, timeout_s=0.5, ttl_s=600, breaker=CircuitBreaker(5, 1.0), mac=MAC)
        cache.write_back(VERSION, [(CUSTOMER, "c-online", _entry(0.3))])
        await cache.drain()
        online = (await cache.read(VERSION, "c-online", "t-none", 0.5)).customer
        batch = (await cache.read(VERSION, "c-batch", "t-none", 0.5)).customer
        await cache.close()
        return got, online, batch

    return asyncio.run(run())


def test_an_acl_user_reads_and_writes_through_every_client(acl_redis: RedisServer) -> None:
    got, online, batch = _round_trip(acl_redis.url_for(USER, PASSWORD))
    assert got == b"v"
    assert online is not None and online.risk_score == 0.3
    assert batch is not None and batch.risk_score == 0.7  # sealed by the batch writer, verified by the reader


def test_every_new_connection_authenticates_again(acl_redis: RedisServer) -> None:
    async def run() -> tuple[object, object]:
        r = PipelinedRedis(acl_redis.url_for(USER, PASSWORD))
        await r.execute("SET", "auth:again", "1")
        first_id = await r.execute("CLIENT", "ID")
        await r.execute("CLIENT", "KILL", "ID", first_id, "SKIPME", "no")  # Redis drops this connection
        await asyncio.sleep(0.05)
        value = await r.execute("GET", "auth:again")  # a new connection: without AUTH this is NOAUTH
        second_id = await r.execute("CLIENT", "ID")
        await r.aclose()
        return value, second_id != first_id

    assert asyncio.run(run()) == (b"1", True)


def test_a_wrong_password_is_refused_naming_redis_never_the_password(acl_redis: RedisServer, tmp_path: Path) -> None:
    wrong = "not-the-pw-3c9d"
    url = acl_redis.url_for(USER, wrong)
    with pytest.raises(RedisRefused) as refused:
        check_connection(url)
    assert f"127.0.0.1:{acl_redis.port}" in str(refused.value) and "WRONGPASS" in str(refused.value)
    assert wrong not in str(refused.value) and "***" in str(refused.value)
    # The batch jobs: refused before any work.
    with pytest.raises(BatchError) as batch:
        bootstrap.batch_cache_writer(Settings(data_dir=tmp_path, redis_url=url))
    assert "WRONGPASS" in str(batch.value) and wrong not in str(batch.value)
    # The service: exit 1 at start, one line naming Redis.
    env = {**os.environ, "REDIS_URL": url, "FRAUDSCORE_DATA_DIR": str(tmp_path), "FRAUDSCORE_AUTH": "off",
           "FRAUDSCORE_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-m", "scoring_service.cli", "serve", "--listen", f"127.0.0.1:{free_port()}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"Redis at redis://{USER}:***@127.0.0.1:{acl_redis.port}" in proc.stderr
    assert wrong not in proc.stderr + proc.stdout


def test_tls_with_a_client_certificate_for_every_client(tls_redis: RedisServer, tls_files: TlsFiles,
                                                        tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=tls_redis.url_for(None, TLS_PASSWORD),
                        redis_tls_cert=tls_files.client_cert, redis_tls_key=tls_files.client_key)
    url = bootstrap.redis_url(settings)  # rediss:// with the CA (in the URL) and the client certificate (settings)
    assert url.startswith("rediss://") and "ssl_certfile=" in url
    got, online, batch = _round_trip(url)
    assert got == b"v"
    assert online is not None and online.risk_score == 0.3
    assert batch is not None and batch.risk_score == 0.7


def test_tls_refuses_an_untrusted_server_and_a_client_without_certificate(tls_redis: RedisServer,
                                                                          tls_files: TlsFiles) -> None:
    no_ca = tls_redis.url_for(None, TLS_PASSWORD).split("?", 1)[0]  # the system CAs do not know the test CA
    with pytest.raises(RedisRefused, match="TLS handshake failed"):
        check_connection(no_ca)
    with pytest.raises(OSError):  # tls-auth-clients yes: no certificate, no session
        check_connection(tls_redis.url_for(None, TLS_PASSWORD))


def test_the_mac_covers_the_key_an_entry_is_stored_under(acl_redis: RedisServer) -> None:
    import redis

    url = acl_redis.url_for(USER, PASSWORD)
    key_a, key_b = (entity_key(VERSION, "0", CUSTOMER, c) for c in ("c-a", "c-b"))
    RedisCacheWriter(url, ttl_s=600, connections=1, mac=MAC).write_items([(key_a.encode(), _entry(0.9).encode())])
    sync = redis.Redis.from_url(url)
    sealed = sync.get(key_a)
    assert sealed is not None and sealed.startswith(b"$m1$k1$")
    payload = open_sealed(MAC, key_a, sealed)
    assert payload is not None and CacheEntry.decode(payload).risk_score == 0.9
    assert open_sealed(MAC, key_b, sealed) is None  # copied to another card: does not verify
