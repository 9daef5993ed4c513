"""API keys hashed with a pepper (rotation: old and new accepted), and the rate limit's documented
fallback to a per-process bucket when Redis does not answer (authentication never depends on it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.sql.db import make_engine, upgrade_schema
from scoring_service.adapters.sql.keys import KeyStore, KeyStoreError, pepper_file
from tests.servers.common import free_port

OLD, NEW = b"old-pepper-0123456789", b"new-pepper-0123456789"


@pytest.fixture()
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade_schema(url)
    return make_engine(url)


def test_the_table_keeps_a_keyed_hash_never_the_key_and_a_pepper_rotation_accepts_both(engine) -> None:  # type: ignore[no-untyped-def]
    principal, key = KeyStore(engine, [OLD]).create("team-a", ["score"])
    assert key is not None and key.startswith("fsk_")
    with engine.connect() as conn:
        stored = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM api_keys")]
    assert not any(key in str(value) for row in stored for value in row)
    rotating = KeyStore(engine, [NEW, OLD])
    found = rotating.by_secret(key)  # old keys still work during the switch
    assert found is not None and (found.key_id, found.owner, found.scopes) == (principal.key_id, "team-a", {"score"})
    assert KeyStore(engine, [NEW]).by_secret(key) is None  # once the old pepper is dropped, they do not
    assert rotating.by_secret(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert rotating.revoke(principal.key_id).revoked_at is not None
    assert rotating.by_secret(key).revoked_at is not None  # type: ignore[union-attr]


def test_bad_key_requests_are_clear_errors(engine) -> None:  # type: ignore[no-untyped-def]
    store = KeyStore(engine, [OLD])
    with pytest.raises(KeyStoreError, match="--scope"):
        store.create("x", ["superuser"])
    with pytest.raises(KeyStoreError, match="no key 99"):
        store.revoke(99)
    with pytest.raises(ValueError, match="16 bytes"):
        KeyStore(engine, [b"short"])


def test_the_pepper_file_is_private_and_stable(tmp_path: Path) -> None:
    first = pepper_file(tmp_path / "key_pepper")
    assert len(first) >= 32 and pepper_file(tmp_path / "key_pepper") == first
    assert (tmp_path / "key_pepper").stat().st_mode & 0o077 == 0


def test_without_redis_the_limit_falls_back_to_a_bucket_per_process() -> None:
    async def run() -> list[tuple[bool, int, bool]]:
        limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nothing listens there
        verdicts = [await limiter.take(7, rate=0.01, burst=3) for _ in range(4)]
        await limiter.close()
        return [(v.allowed, v.retry_after_ms, v.shared) for v in verdicts]

    verdicts = asyncio.run(run())
    assert [v[0] for v in verdicts] == [True, True, True, False]
    assert all(not shared for _, _, shared in verdicts)
    assert verdicts[-1][1] > 0  # the pushback: when a token is back
