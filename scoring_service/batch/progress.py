"""Progress for batch jobs: a rich progress bar on a terminal, structured log lines otherwise; and the
phases and counts told to an observer (the run's metrics, ``batch/metrics.py``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from scoring_service.logging import get_logger

log = get_logger("batch.progress")


class PhaseObserver(Protocol):
    def enter(self, phase: str) -> None: ...

    def advanced(self, phase: str, k: int) -> None: ...


class Progress:
    def __init__(self, job: str, enabled: bool | None = None, log_every_s: float = 5.0,
                 observer: PhaseObserver | None = None) -> None:
        self.job = job
        self.observer = observer
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.log_every_s = log_every_s
        self._rich = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), transient=False)

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """``with progress.phase("write", n) as advance: advance(k)``; logs start/end."""
        started = time.monotonic()
        done = [0]
        last = [started]
        task = self._rich.add_task(name, total=total) if self._rich is not None else None
        if self.observer is not None:
            self.observer.enter(name)

        def advance(k: int) -> None:
            done[0] += k
            if self.observer is not None:
                self.observer.advanced(name, k)
            if task is not None:
                self._rich.update(task, advance=k)  # type: ignore[union-attr]
            else:
                now = time.monotonic()
                if now - last[0] >= self.log_every_s:
                    last[0] = now
                    log.info("batch.progress", job=self.job, phase=name, done=done[0], total=total,
                             seconds=round(now - started, 1))

        yield advance
        if task is not None:
            self._rich.update(task, completed=total if total is not None else done[0])  # type: ignore[union-attr]
        log.info("batch.phase_done", job=self.job, phase=name, items=done[0],
                 seconds=round(time.monotonic() - started, 3))
