"""The limits of the auth layer (issue 21): failed authentication per address (finding 6), on a
real SQLite key table: which calls are looked up (a thread hop and a SQL query each), which are
answered from memory, which are refused before any lookup; and a ScoreBatch's cost in the token
bucket (finding 5). Through the real server and Redis: tests/e2e/test_security_auth.py."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from scoring_service.adapters.redis.rate_limit import RateLimiter
from scoring_service.adapters.sql.db import make_engine, upgrade_schema
from scoring_service.adapters.sql.keys import KeyStore
from scoring_service.online.auth import LOOKUPS, Authenticator, FailureBudget, PeerLimited, peer_address
from tests.servers.common import free_port

PEPPER = b"unit-pepper-0123456789"


@pytest.fixture()
def store(tmp_path: Path) -> KeyStore:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade_schema(url)
    return KeyStore(make_engine(url), [PEPPER])


def lookups() -> float:
    return sum(LOOKUPS.labels(result)._value.get() for result in ("found", "unknown", "revoked"))


def wrong() -> str:
    return "fsk_" + secrets.token_urlsafe(32)


def test_an_address_is_the_peer_without_its_port_and_an_ipv6_host_is_its_64():
    assert peer_address("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_address("ipv6:%5B2001:db8:1:2:aaaa::1%5D:443") == "2001:db8:1:2::/64"
    assert peer_address("ipv6:[2001:db8:1:2:bbbb::9]:80") == "2001:db8:1:2::/64"  # same host, another address
    assert peer_address("ipv6:%5B::ffff:192.0.2.4%5D:5000") == "192.0.2.4"  # an IPv4 client on a dual-stack socket
    assert peer_address("unix:/run/fraudscore.sock") == "unix:/run/fraudscore.sock"


def test_past_its_budget_an_address_is_refused_before_any_lookup_and_gets_it_back_with_time():
    async def main() -> None:
        budget = FailureBudget(rate_per_s=50.0, burst=3)
        for _ in range(3):
            budget.take("10.0.0.7")
        with pytest.raises(PeerLimited) as refused:
            budget.take("10.0.0.7")
        assert refused.value.address == "10.0.0.7" and 0 < refused.value.retry_after_ms <= 20
        assert "10.0.0.7" in budget.message(refused.value) and "at most 3, then 50/s" in budget.message(refused.value)
        budget.take("10.0.0.8")  # another address has its own
        await asyncio.sleep(refused.value.retry_after_ms / 1000.0 + 0.005)
        budget.take("10.0.0.7")

    asyncio.run(main())


def test_wrong_keys_cost_a_lookup_each_only_within_the_budget_and_a_known_good_key_is_never_refused(
        store: KeyStore) -> None:
    async def main() -> None:
        _, good = store.create("payments", ["score"])
        assert good is not None
        auth = Authenticator(store, ttl_s=0.05, failures=FailureBudget(rate_per_s=0.01, burst=5))
        peer = lambda: "ipv4:10.1.2.3:40000"  # noqa: E731
        assert (await auth.by_key(good, peer)) is not None  # found good: its failure given back
        before = lookups()
        assert [await auth.by_key(wrong(), peer) for _ in range(5)] == [None] * 5
        assert lookups() == before + 5
        for _ in range(20):  # past the budget: refused, nothing looked up
            with pytest.raises(PeerLimited):
                await auth.by_key(wrong(), peer)
        assert lookups() == before + 5
        await asyncio.sleep(0.06)  # the good key's entry is stale: looked up again, not refused
        principal = await auth.by_key(good, peer)
        assert principal is not None and principal.owner == "payments" and lookups() == before + 6
        with pytest.raises(PeerLimited):  # a key this process never found good, from that address
            await auth.by_key(store.create("newcomer", ["score"])[1] or "", peer)
        assert (await auth.by_key(wrong(), lambda: "ipv4:10.9.9.9:1")) is None  # another address: looked up
        assert lookups() == before + 7

    asyncio.run(main())


def test_a_repeated_wrong_key_is_answered_from_memory_and_charged_and_revocation_still_applies(
        store: KeyStore) -> None:
    async def main() -> None:
        principal, key = store.create("leaver", ["score"])
        assert key is not None
        auth = Authenticator(store, ttl_s=0.05, failures=FailureBudget(rate_per_s=0.01, burst=4))
        peer = lambda: "ipv4:10.1.2.4:40000"  # noqa: E731
        stale = wrong()
        before = lookups()
        assert await auth.by_key(stale, peer) is None and await auth.by_key(stale, peer) is None
        assert lookups() == before + 1  # the second from the negative cache: no thread hop
        assert (await auth.by_key(key, peer)) is not None
        store.revoke(principal.key_id)
        await asyncio.sleep(0.06)
        revoked = await auth.by_key(key, peer)  # the known key looked up again: found revoked, charged
        assert revoked is not None and revoked.revoked_at is not None
        assert (await auth.by_key(key, peer)).revoked_at is not None  # type: ignore[union-attr]
        with pytest.raises(PeerLimited):  # 2 wrong + 2 revoked: the budget of 4 is spent
            await auth.by_key(stale, peer)

    asyncio.run(main())


def test_a_key_table_that_cannot_be_read_is_not_counted_against_the_caller(tmp_path: Path) -> None:
    async def main() -> None:
        broken = KeyStore(make_engine(f"sqlite:///{tmp_path / 'missing' / 'keys.db'}"), [PEPPER])
        auth = Authenticator(broken, failures=FailureBudget(rate_per_s=0.01, burst=1))
        for _ in range(3):  # the database error each time, never PeerLimited
            with pytest.raises(Exception) as raised:
                await auth.by_key(wrong(), lambda: "ipv4:10.1.2.5:1")
            assert not isinstance(raised.value, PeerLimited)

    asyncio.run(main())


def test_a_batch_takes_a_token_per_payment_and_one_past_the_burst_is_never_taken():
    """The bucket (here a process' own: no Redis listens) never takes more than it holds; a cost past
    the burst is an error, not a refusal with a pushback that no wait would honour."""
    async def main() -> tuple[list[bool], int]:
        limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
        with pytest.raises(ValueError, match="more than the bucket's 10"):
            await limiter.take(7, rate=20.0, burst=10, cost=11)
        verdicts = [await limiter.take(7, rate=20.0, burst=10, cost=cost) for cost in (10, 1)]
        await limiter.close()
        return [v.allowed for v in verdicts], verdicts[-1].retry_after_ms

    allowed, pushback = asyncio.run(main())
    assert allowed == [True, False] and 0 < pushback <= 50  # one token back in 50 ms at 20/s


class _Context:
    """What a precheck reads of a call: its peer, its metadata and (no client certificate) auth context."""

    def __init__(self, peer: str, secret: str | None) -> None:
        self._peer, self._md = peer, ((("x-api-key", secret),) if secret is not None else ())

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return self._md

    def auth_context(self) -> dict:
        return {}


def test_past_its_budget_an_address_is_refused_before_decoding_unless_its_key_was_found_good(store: KeyStore) -> None:
    """AuthInterceptor.precheck, which admission control runs before decoding a call or passing it to
    any other interceptor: the same refusal as the lookup path's (RESOURCE_EXHAUSTED, pushback),
    without an exception, and never for a key this process found good."""
    from scoring_service.online.auth import REFUSED, AuthInterceptor

    async def main() -> None:
        _, good = store.create("payments", ["score"])
        assert good is not None
        auth = Authenticator(store, ttl_s=5.0, failures=FailureBudget(rate_per_s=0.01, burst=3))
        interceptor = AuthInterceptor(auth, RateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05),
                                      {"/x": "score"}, default_rate=10.0, default_burst=10)
        address = "ipv4:10.7.7.7:5000"
        assert interceptor.precheck(_Context(address, wrong())) is None  # a fresh address: looked up as usual
        assert (await auth.by_key(good, lambda: address)) is not None
        for _ in range(3):
            assert (await auth.by_key(wrong(), lambda: address)) is None
        refused_before = REFUSED.labels("failure_budget")._value.get()
        refusal = interceptor.precheck(_Context(address, wrong()))
        assert refusal is not None and refusal.code.name == "RESOURCE_EXHAUSTED"
        assert "too many failed authentications from 10.7.7.7" in refusal.message
        assert refusal.trailing[0][0] == "grpc-retry-pushback-ms" and int(refusal.trailing[0][1]) > 0
        assert interceptor.precheck(_Context(address, None)) is not None  # no key at all: refused too
        assert REFUSED.labels("failure_budget")._value.get() == refused_before + 2
        assert interceptor.precheck(_Context(address, good)) is None  # the good key goes on to its checks
        assert interceptor.precheck(_Context("ipv4:10.8.8.8:1", wrong())) is None  # another address

    asyncio.run(main())
