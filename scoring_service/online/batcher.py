"""Coalesces concurrent cache misses into one model call.

A bounded asyncio queue, one future per request, a size bound and a time bound. The model runs
on a dedicated thread (XGBoost and LightGBM release the GIL), so the event loop keeps serving
cache hits while a batch is scored, and requests that arrive meanwhile form the next batch.

Adaptive wait: after the first row of a batch is taken, the batcher waits up to ``max_wait_s``
for more rows only when the previous batch held more than one row (there is concurrent load to
coalesce). An idle service therefore adds no wait to a lone request; a busy one fills batches.
The queue bound is the backpressure: when it is full, ``submit`` raises :class:`Overloaded`.

After each batch the batcher yields to the event loop, so the answered requests go on and the
requests whose time ran out give up (and are skipped) before the next batch is scored, even when
a burst (a ScoreBatch of new cards) keeps the queue full and the batches run on the event loop.

A model call that raises for a batch does not fail the whole batch: its rows are scored again
one by one (in the model thread), and only the rows that fail on their own get
:class:`ModelFailed` (the model's exception as its cause, logged here); the other requests get
their answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from scoring_service.logging import get_logger
from scoring_service.online import telemetry, tracing

log = get_logger(__name__)

BatchFn = Callable[[np.ndarray], tuple[np.ndarray, list[Any]]]


class Overloaded(Exception):
    """The batcher's queue is full."""


class ModelFailed(Exception):
    """The model raised for this row (scored on its own); the model's exception is the cause."""


Answer = tuple[float, Any]  # (probability, explanation) of one row


class MicroBatcher:
    def __init__(self, fn: BatchFn, *, max_size: int, max_wait_s: float, executor: Executor, max_queue: int = 0,
                 inline_max_rows: int = 0) -> None:
        self._fn = fn
        self.inline_max_rows = inline_max_rows  # batches this small run on the event loop: no thread hop
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._executor = executor
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Answer], int]] = asyncio.Queue(
            max_queue or max_size * 32
        )  # (row, its answer, when it was queued: time.time_ns())
        self.device = "cpu"  # the label of fraudscore_inference_seconds (ServingModel.of sets the model's)
        self._timings: dict[int, tuple[int, int]] = {}  # id(future) -> its batch's model call (ns), while tracing
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
            _, fut, _ = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(Overloaded("batcher stopped"))

    async def submit(self, row: np.ndarray) -> Answer:
        """Score one feature row; returns (probability, explanation)."""
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        queued = time.time_ns()
        try:
            self._queue.put_nowait((row, fut, queued))
        except asyncio.QueueFull:
            raise Overloaded(f"more than {self._queue.maxsize} rows waiting for the model") from None
        if not tracing.enabled():
            return await fut
        try:
            return await fut
        finally:
            timing = self._timings.pop(id(fut), None)
            if timing is not None:
                tracing.timed_span("batcher.wait", queued, timing[0])
                tracing.timed_span("inference", timing[0], timing[1], device=self.device)

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future[Answer], int]]:
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
        while True:
            batch = await self._collect()
            now = time.time_ns()
            for _, _, queued in batch:
                telemetry.BATCH_WAIT.observe((now - queued) / 1e9)
            live = [(row, fut) for row, fut, _ in batch if not fut.done()]  # skip requests that gave up
            self._last_batch = len(batch)
            if live:
                await self._score(live)
            # Let the answered requests go on (and those out of time give up) before the next batch:
            # with a full queue, neither _collect nor an inline batch gives the event loop a turn.
            await asyncio.sleep(0)

    async def _score(self, live: list[tuple[np.ndarray, asyncio.Future[Answer]]]) -> None:
        """Score the rows of one batch and settle their futures."""
        rows = [row for row, _ in live]
        answers: list[Answer | BaseException]
        started = time.time_ns()
        try:
            try:
                answers = list(await self._in_place(self._batch, rows))
                ended = time.time_ns()
                telemetry.BATCH_SIZE.observe(len(rows))
                telemetry.INFERENCE.labels(self.device).observe((ended - started) / 1e9)
                if tracing.enabled():
                    if len(self._timings) > 10_000:  # calls cancelled while their batch was scored never pop theirs
                        self._timings.clear()
                    for _, fut in live:
                        self._timings[id(fut)] = (started, ended)
            except Exception as exc:
                if len(rows) == 1:
                    answers = [exc]
                else:  # which rows? each on its own, in the model thread (a failure is rare: keep the loop free)
                    log.warning("model.batch_failed", rows=len(rows), error=type(exc).__name__, retry="row by row")
                    answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._one_by_one, rows)
        except asyncio.CancelledError:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(Overloaded("batcher stopped"))
            raise
        except Exception as exc:  # no model thread to retry in (shutting down): the batch fails, the batcher goes on
            answers = [exc] * len(rows)
        self.batches += 1
        self.rows += len(live)
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:
            # One line per batch: the first failing row's exception (with its traceback) and how many failed.
            log.error("model.rows_failed", rows=len(failed), batch=len(live), error=type(failed[0]).__name__,
                      exc_info=failed[0])
        for (_, fut), answer in zip(live, answers, strict=True):
            if fut.done():
                continue
            if isinstance(answer, BaseException):
                error = ModelFailed("model error")
                error.__cause__ = answer
                fut.set_exception(error)
            else:
                fut.set_result(answer)

    async def _in_place(self, fn: Callable[[list[np.ndarray]], list[Answer]], rows: list[np.ndarray]) -> list[Answer]:
        """``fn(rows)`` on the event loop for small batches, else in the model thread."""
        if len(rows) <= self.inline_max_rows:
            return fn(rows)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, rows)

    def _batch(self, rows: list[np.ndarray]) -> list[Answer]:
        """One model call for all the rows."""
        probs, explanations = self._fn(np.stack(rows))
        return [(float(probs[i]), explanations[i]) for i in range(len(rows))]

    def _one_by_one(self, rows: list[np.ndarray]) -> list[Answer | BaseException]:
        """Each row of a failed batch on its own: its answer, or the exception it raised."""
        answers: list[Answer | BaseException] = []
        for row in rows:
            try:
                answers.append(self._batch([row])[0])
            except Exception as exc:
                answers.append(exc)
        return answers
