"""scoring_service.resp.PipelinedRedis against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis

from scoring_service.adapters.redis.resp import PipelinedRedis, RedisReplyError, pack
from tests.servers.redis import RedisServer


def test_pack_is_resp2_bulk_strings() -> None:
    assert pack(("SET", "k", b"v\r\n", 60)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$2\r\n60\r\n"


def test_the_bulk_set_fast_path_encodes_like_the_generic_packer() -> None:
    from scoring_service.adapters.redis.protocol import pack_many, pack_set_ex_many

    items = [(b"k1", b"v\r\n1"), (b"k\xff", b""), (b"%s%d", b"100%")]
    assert pack_set_ex_many(items, 60) == pack_many([("SET", k, v, "EX", 60) for k, v in items])
    assert pack_set_ex_many([], 60) == b""


def test_commands_replies_and_errors(redis_url: str) -> None:
    async def run():
        r = PipelinedRedis(redis_url)
        assert await r.execute("SET", "resp:a", b"\x00binary\r\nvalue") == b"OK"
        assert await r.execute("SET", "resp:a", "other", "NX") is None  # NX on an existing key
        got = await r.execute("MGET", "resp:a", "resp:missing")
        replies = await r.execute_many([("INCR", "resp:n"), ("INCR", "resp:a"), ("GET", "resp:n")])
        with pytest.raises(RedisReplyError, match="not an integer"):
            await r.execute("INCR", "resp:a")
        after = await r.execute("GET", "resp:n")  # still in step after an error
        await r.aclose()
        return got, replies, after

    got, replies, after = asyncio.run(run())
    assert got == [b"\x00binary\r\nvalue", None]
    assert replies[0] == 1 and isinstance(replies[1], RedisReplyError) and replies[2] == b"1"
    assert after == b"1"


def test_concurrent_callers_share_one_connection_and_get_their_own_replies(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.mset({f"resp:c:{i}": str(i * 7) for i in range(500)})

    async def run():
        r = PipelinedRedis(redis_url)
        out = await asyncio.gather(*(r.execute("GET", f"resp:c:{i}") for i in range(500)),
                                   *(r.execute_many([("GET", f"resp:c:{i}"), ("EXISTS", f"resp:c:{i}")]) for i in range(100)))
        name = await r.execute("CLIENT", "SETNAME", "resp-test")
        await r.aclose()
        return out, name

    out, name = asyncio.run(run())
    assert out[:500] == [str(i * 7).encode() for i in range(500)]
    assert out[500:] == [[str(i * 7).encode(), 1] for i in range(100)]
    assert name == b"OK"
    clients = [c for c in sync.client_list() if c.get("name") == "resp-test"]
    assert clients == []  # closed: the one connection is gone


def test_a_caller_that_gave_up_does_not_shift_the_replies(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set("resp:after", "right")

    async def run():
        r = PipelinedRedis(redis_url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await r.execute("BLPOP", "resp:empty-list", "0.3")  # Redis answers nil after 0.3 s
        value = await r.execute("GET", "resp:after")  # queued behind the abandoned BLPOP
        await r.aclose()
        return value

    assert asyncio.run(run()) == b"right"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_late_event_loop_does_not_time_out_on_a_reply_that_arrived(redis_url: str, loop: str) -> None:
    """The loop is blocked past the deadline while Redis answers: the reply wins, as it should.

    With ``asyncio.timeout`` both loops raise TimeoutError here (the timer cancels the task before
    the reply's wake-up runs), which is what made busy workers report a working Redis as down."""
    import time

    from scoring_service.online.runtime import run_event_loop

    async def run():
        r = PipelinedRedis(redis_url)
        await r.execute("SET", "resp:late", "here")
        got = []
        for i in range(6):
            if i < 5:
                task = asyncio.ensure_future(r.execute("GET", "resp:late", timeout_s=0.005))
            else:  # a pipeline too
                task = asyncio.ensure_future(r.execute_many([("GET", "resp:late"), ("EXISTS", "resp:late")], timeout_s=0.005))
            await asyncio.sleep(0)  # the command is queued and its send scheduled
            await asyncio.sleep(0)  # sent
            time.sleep(0.03)  # the loop is busy elsewhere: Redis answers, the deadline passes
            got.append(await task)
        with pytest.raises(TimeoutError, match="within"):  # a reply that does not come still times out
            await r.execute("BLPOP", "resp:late-empty", "0.5", timeout_s=0.02)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await r.execute("BLPOP", "resp:late-empty", "0.5", timeout_s=0.02)
        waited = time.monotonic() - t0
        await r.aclose()
        return got, waited

    got, waited = run_event_loop(run(), loop)
    assert got == [b"here"] * 5 + [[b"here", 1]]
    assert waited < 0.3  # gave up near its deadline, not when Redis answered (0.5 s)


def test_a_killed_connection_fails_its_waiters_and_the_next_command_reconnects(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set("resp:k", "v")

    async def run():
        r = PipelinedRedis(redis_url)
        await r.execute("CLIENT", "SETNAME", "resp-victim")
        waiting = asyncio.ensure_future(r.execute("BLPOP", "resp:never", "5"))
        await asyncio.sleep(0.1)
        killed = None
        for c in sync.client_list():
            if c.get("name") == "resp-victim":
                killed = sync.execute_command("CLIENT", "KILL", "ID", c["id"])
        with pytest.raises(ConnectionError):
            await waiting
        value = await r.execute("GET", "resp:k")
        await r.aclose()
        return killed, value

    killed, value = asyncio.run(run())
    assert killed == 1
    assert value == b"v"


def test_url_database_and_password() -> None:
    server = RedisServer(extra_args=("--requirepass", "s3cr:et")).start()
    try:
        sync = redis.Redis(port=server.port, password="s3cr:et", db=3)

        async def run(url):
            r = PipelinedRedis(url)
            try:
                return await r.execute("SET", "resp:db", "three")
            finally:
                await r.aclose()

        assert asyncio.run(run(f"redis://:s3cr%3Aet@127.0.0.1:{server.port}/3")) == b"OK"
        assert sync.get("resp:db") == b"three"
        with pytest.raises(RedisReplyError, match="WRONGPASS|invalid"):
            asyncio.run(run(f"redis://:wrong@127.0.0.1:{server.port}/0"))
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            asyncio.run(run(f"redis://127.0.0.1:{server.port}/0"))
    finally:
        server.stop()


def test_refused_connection_and_bad_scheme() -> None:
    from tests.servers.common import free_port

    async def run():
        r = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0")
        await r.execute("PING")

    with pytest.raises(OSError):
        asyncio.run(run())
    with pytest.raises(ValueError, match="unsupported scheme"):
        PipelinedRedis("http://127.0.0.1:6379")


def test_a_hung_connection_is_dropped_once_its_replies_are_overdue() -> None:
    server = RedisServer().start()
    try:
        async def run():
            r = PipelinedRedis(server.url, stale_after_s=0.2)
            await r.execute("SET", "resp:h", "v")
            first = r._proto
            server.pause()  # SIGSTOP: the socket stays open, nothing answers
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await r.execute("GET", "resp:h")
            await asyncio.sleep(0.3)
            with pytest.raises(ConnectionError, match="overdue"):
                await r.execute("GET", "resp:h")  # the overdue connection is dropped here
            server.resume()
            value = await r.execute("GET", "resp:h")  # on a new connection
            fresh = r._proto
            await r.aclose()
            return first, fresh, value

        first, fresh, value = asyncio.run(run())
        assert value == b"v"
        assert fresh is not first
    finally:
        server.resume()
        server.stop()
