import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scoring_service.adapters.redis.entity_cache import CircuitBreaker
from scoring_service.core.cache_layout import CacheEntry, active_generation_key, entity_key
from scoring_service.online.batcher import MicroBatcher, Overloaded


def test_concurrent_rows_are_coalesced_and_answered_in_place():
    calls = []
    gate = threading.Event()

    def fn(x):
        calls.append(len(x))
        gate.wait(1)
        return x[:, 0] * 2, [f"r{v}" for v in x[:, 0]]

    async def main():
        b = MicroBatcher(fn, max_size=16, max_wait_s=0.001, executor=ThreadPoolExecutor(1))
        b.start()
        first = asyncio.create_task(b.submit(np.array([0.0])))
        await asyncio.sleep(0.02)  # the first batch is now blocked in the model
        rest = [asyncio.create_task(b.submit(np.array([float(i)]))) for i in range(1, 11)]
        await asyncio.sleep(0.02)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert out == [(2.0 * i, f"r{float(i)}") for i in range(11)]
    assert calls == [1, 10]  # the ten that queued behind the first went in one call


def test_batch_size_bound():
    sizes = []

    def fn(x):
        sizes.append(len(x))
        time.sleep(0.01)
        return x[:, 0], [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=4, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
        b.start()
        await asyncio.gather(*(b.submit(np.array([float(i)])) for i in range(13)))
        await b.stop()

    asyncio.run(main())
    assert max(sizes) <= 4 and sum(sizes) == 13


def test_full_queue_is_backpressure_not_a_hang():
    def fn(x):
        time.sleep(0.2)
        return x[:, 0], [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=1, max_wait_s=0.0, executor=ThreadPoolExecutor(1), max_queue=2)
        b.start()
        tasks = [asyncio.create_task(b.submit(np.array([1.0])))]
        await asyncio.sleep(0.02)  # the batcher has taken the first row into the model
        tasks += [asyncio.create_task(b.submit(np.array([1.0]))) for _ in range(2)]
        await asyncio.sleep(0.01)  # two rows wait: the queue (bound 2) is full
        with pytest.raises(Overloaded):
            await b.submit(np.array([1.0]))
        await asyncio.gather(*tasks)
        await b.stop()

    asyncio.run(main())


def test_model_error_fails_the_batch_not_the_batcher():
    n = {"calls": 0}

    def fn(x):
        n["calls"] += 1
        if n["calls"] == 1:
            raise ValueError("boom")
        return x[:, 0], [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
        b.start()
        with pytest.raises(ValueError):
            await b.submit(np.array([1.0]))
        assert (await b.submit(np.array([3.0])))[0] == 3.0
        await b.stop()

    asyncio.run(main())


def test_breaker_opens_then_half_opens_then_closes():
    br = CircuitBreaker(failures=3, reset_s=0.05)
    for _ in range(3):
        assert br.allow()
        br.failure()
    assert br.state == "open" and not br.allow()
    time.sleep(0.06)
    assert br.allow()  # one trial
    assert not br.allow()  # only one
    br.success()
    assert br.state == "closed" and br.allow()


def test_failed_trial_keeps_the_breaker_open():
    br = CircuitBreaker(failures=1, reset_s=0.05)
    br.failure()
    time.sleep(0.06)
    assert br.allow()
    br.failure()
    assert br.state == "open" and not br.allow()


def test_cache_entry_round_trip_and_keys_carry_model_version_and_generation():
    e = CacheEntry(0.25, {"nb_tx_30d": 3.0}, "xgb-1", 1.5e9, [("A", "a", 0.5)], "42")
    assert CacheEntry.decode(e.encode()) == e
    assert "xgb-1" in entity_key("xgb-1", "42", "c", "cust") and ":42:" in entity_key("xgb-1", "42", "c", "cust")
    assert entity_key("xgb-1", "42", "c", "x") != entity_key("xgb-2", "42", "c", "x")
    assert active_generation_key("xgb-1") != active_generation_key("xgb-2")


def test_small_batches_run_inline_and_large_ones_in_the_executor():
    where = []

    def fn(x):
        where.append((len(x), threading.current_thread().name))
        if len(x) == 2:
            raise ValueError("bad batch")
        return x[:, 0] + 1, [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1, thread_name_prefix="model"),
                         inline_max_rows=4)
        b.start()
        one = await b.submit(np.array([1.0]))
        # an inline batch that fails fails its own requests only
        bad = await asyncio.gather(b.submit(np.array([0.0])), b.submit(np.array([0.0])), return_exceptions=True)
        many = await asyncio.gather(*(b.submit(np.array([float(i)])) for i in range(6)))
        await b.stop()
        return one, bad, many

    one, bad, many = asyncio.run(main())
    assert one == (2.0, None) and many == [(float(i) + 1, None) for i in range(6)]
    assert all(isinstance(e, ValueError) for e in bad)
    main_thread = threading.main_thread().name
    assert where[0] == (1, main_thread) and where[1] == (2, main_thread)
    assert sum(n for n, _ in where[2:]) == 6
    assert all(name.startswith("model") if n > 4 else name == main_thread for n, name in where[2:])
    assert any(n > 4 for n, _ in where[2:])  # the six queued together: at least one batch went to the model thread
