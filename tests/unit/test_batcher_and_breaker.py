import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scoring_service.adapters.redis.entity_cache import CircuitBreaker
from scoring_service.core.cache_layout import CacheEntry, active_generation_key, entity_key
from scoring_service.online.batcher import MicroBatcher, ModelFailed, Overloaded


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


def test_model_error_fails_the_row_not_the_batcher():
    n = {"calls": 0}

    def fn(x):
        n["calls"] += 1
        if n["calls"] == 1:
            raise ValueError("boom")
        return x[:, 0], [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
        b.start()
        with pytest.raises(ModelFailed, match="^model error$") as exc:
            await b.submit(np.array([1.0]))
        assert isinstance(exc.value.__cause__, ValueError)  # the model's own exception, for the log
        assert (await b.submit(np.array([3.0])))[0] == 3.0
        await b.stop()

    asyncio.run(main())


def _poisoned(calls):
    """A model that raises for any batch holding a negative row (as XGBoost does for an infinite feature)."""

    def fn(x):
        calls.append(len(x))
        if (x[:, 0] < 0).any():
            raise ValueError("Input data contains `inf`")
        return x[:, 0] * 10, [f"r{v}" for v in x[:, 0]]

    return fn


@pytest.mark.parametrize("inline_max_rows", [0, 64], ids=["model-thread", "inline"])
def test_a_row_that_makes_the_model_fail_fails_alone(inline_max_rows):
    calls = []

    async def main():
        b = MicroBatcher(_poisoned(calls), max_size=64, max_wait_s=0.0, executor=ThreadPoolExecutor(1),
                         inline_max_rows=inline_max_rows)
        b.start()
        values = [1.0, 2.0, -1.0, 3.0, -2.0, 4.0]  # submitted in one turn of the loop: one batch
        out = await asyncio.gather(*(b.submit(np.array([v])) for v in values), return_exceptions=True)
        later = await b.submit(np.array([5.0]))  # the batcher goes on
        await b.stop()
        return values, out, later

    values, out, later = asyncio.run(main())
    for v, answer in zip(values, out, strict=True):
        if v < 0:
            assert isinstance(answer, ModelFailed) and str(answer) == "model error"
            assert isinstance(answer.__cause__, ValueError)
        else:
            assert answer == (v * 10, f"r{v}")
    assert later == (50.0, "r5.0")
    assert calls == [6] + [1] * 6 + [1]  # the failed batch of six, each of its rows alone, then the next one


def test_rows_that_gave_up_while_the_batch_failed_are_skipped():
    def fn(x):
        raise RuntimeError("model broken")

    async def main():
        b = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=ThreadPoolExecutor(1), inline_max_rows=8)
        b.start()
        out = await asyncio.gather(*(b.submit(np.array([float(i)])) for i in range(5)), return_exceptions=True)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert all(isinstance(e, ModelFailed) and isinstance(e.__cause__, RuntimeError) for e in out)


def test_the_batcher_yields_between_batches_so_answers_and_timeouts_are_not_held_back():
    """A burst that fills the queue, scored inline: answered requests go on after their own batch
    and requests out of time give up (and are skipped) instead of waiting for the whole queue."""
    calls = []

    def fn(x):
        calls.append(len(x))
        time.sleep(0.01)  # an inline model call: the event loop is busy for 10 ms
        return x[:, 0], [None] * len(x)

    async def main():
        b = MicroBatcher(fn, max_size=4, max_wait_s=0.0, executor=ThreadPoolExecutor(1), inline_max_rows=4)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        done_at = {}

        async def one(i):
            try:
                async with asyncio.timeout(0.035):
                    await b.submit(np.array([float(i)]))
                done_at[i] = loop.time() - t0
            except TimeoutError:
                done_at[i] = None

        await asyncio.gather(*(one(i) for i in range(40)))
        await b.stop()
        return done_at

    done_at = asyncio.run(main())
    answered = [t for t in done_at.values() if t is not None]
    # the first batches' answers did not wait for the whole queue (10 batches: 100 ms)
    assert answered and min(answered) < 0.03 and max(answered) < 0.07
    assert sum(t is None for t in done_at.values()) > 0  # the rest gave up at their deadline ...
    assert sum(calls) < 40  # ... and were not scored after it


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
        # an inline batch that fails is scored again row by row, in the model thread: each row alone succeeds
        retried = await asyncio.gather(b.submit(np.array([0.0])), b.submit(np.array([0.0])), return_exceptions=True)
        many = await asyncio.gather(*(b.submit(np.array([float(i)])) for i in range(6)))
        await b.stop()
        return one, retried, many

    one, retried, many = asyncio.run(main())
    assert one == (2.0, None) and many == [(float(i) + 1, None) for i in range(6)]
    assert retried == [(1.0, None), (1.0, None)]
    main_thread = threading.main_thread().name
    assert where[:2] == [(1, main_thread), (2, main_thread)]
    assert [n for n, _ in where[2:4]] == [1, 1] and all(name.startswith("model") for _, name in where[2:4])
    assert sum(n for n, _ in where[4:]) == 6
    assert all(name.startswith("model") if n > 4 else name == main_thread for n, name in where[4:])
    assert any(n > 4 for n, _ in where[4:])  # the six queued together: at least one batch went to the model thread


def test_no_model_thread_fails_the_batch_not_the_batcher():
    def fn(x):
        return x[:, 0], [None] * len(x)

    async def main():
        executor = ThreadPoolExecutor(1)
        executor.shutdown()  # as on the way out of a stopping server
        b = MicroBatcher(fn, max_size=8, max_wait_s=0.0, executor=executor, inline_max_rows=1)
        b.start()
        out = await asyncio.gather(*(b.submit(np.array([float(i)])) for i in range(3)), return_exceptions=True)
        alone = await b.submit(np.array([7.0]))  # inline: still answered
        await b.stop()
        return out, alone

    out, alone = asyncio.run(main())
    assert all(isinstance(e, ModelFailed) and isinstance(e.__cause__, RuntimeError) for e in out)
    assert alone == (7.0, None)
