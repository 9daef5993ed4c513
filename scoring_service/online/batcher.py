"""Coalesces concurrent cache misses into one model call.

A bounded asyncio queue, one future per request, a size bound and a time bound. The model runs
on a dedicated thread (XGBoost and LightGBM release the GIL), so the event loop keeps serving
cache hits while a batch is scored, and requests that arrive meanwhile form the next batch.

Adaptive wait: after the first row of a batch is taken, the batcher waits up to ``max_wait_s``
for more rows only when the previous batch held more than one row (there is concurrent load to
coalesce). An idle service therefore adds no wait to a lone request; a busy one fills batches.
The queue bound is the backpressure: when it is full, ``submit`` raises :class:`Overloaded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from scoring_service.logging import get_logger

log = get_logger(__name__)

BatchFn = Callable[[np.ndarray], tuple[np.ndarray, list[Any]]]


class Overloaded(Exception):
    """The batcher's queue is full."""


class MicroBatcher:
    def __init__(self, fn: BatchFn, *, max_size: int, max_wait_s: float, executor: Executor, max_queue: int = 0,
                 inline_max_rows: int = 0) -> None:
        self._fn = fn
        self.inline_max_rows = inline_max_rows  # batches this small run on the event loop: no thread hop
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._executor = executor
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[tuple[float, Any]]]] = asyncio.Queue(
            max_queue or max_size * 32
        )
        self._task: asyncio.Task[None] | None = None
        self._last_batch = 0
        self.batches = 0
        self.rows = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(Overloaded("batcher stopped"))

    async def submit(self, row: np.ndarray) -> tuple[float, Any]:
        """Score one feature row; returns (probability, explanation)."""
        fut: asyncio.Future[tuple[float, Any]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((row, fut))
        except asyncio.QueueFull:
            raise Overloaded(f"more than {self._queue.maxsize} rows waiting for the model") from None
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future[tuple[float, Any]]]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        wait = self.max_wait_s if self._last_batch > 1 else 0.0
        deadline = loop.time() + wait
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(row, fut) for row, fut in batch if not fut.done()]  # skip requests that gave up
            self._last_batch = len(batch)
            if not live:
                continue
            try:
                x = np.stack([row for row, _ in live])
                if len(live) <= self.inline_max_rows:
                    probs, explanations = self._fn(x)
                else:
                    probs, explanations = await loop.run_in_executor(self._executor, self._fn, x)
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(Overloaded("batcher stopped"))
                raise
            except Exception as exc:  # a model failure fails this batch's requests, not the service
                log.exception("model.batch_failed", rows=len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.rows += len(live)
            for i, (_, fut) in enumerate(live):
                if not fut.done():
                    fut.set_result((float(probs[i]), explanations[i]))
