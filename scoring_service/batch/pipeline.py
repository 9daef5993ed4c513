"""The nightly batch: rebuild every entity's cache entry from the events of the feature window.

:func:`run_batch` is the one pipeline of ``nightly``, ``replay`` and ``rebuild_cache``. Its steps,
each timed and recorded in ``batch_runs.details["phases"]``:

1. **window**: ``as_of`` (default now) minus the longest feature window and the label delay
   (``scoring_service.core.events.nightly_window``, from the constants of ``core.features``).
2. **read** (phase ``consume``): the window's events from the event source
   (``scoring_service.batch.sources.EventSource``: Kafka or a file); bad events are dead letters,
   counted - a run never stops for them. A window without a single valid payment fails the run
   (:class:`EmptyWindow`, recorded ``failed``, nothing written or switched), see below.
3. **build entries** (phases ``features``/``score``/``explain``):
   ``scoring_service.core.entity_scoring.build_entries`` (the one definition of entity risk)
   with the active model.
4. **write**: every entry under a fresh generation (the cache writer).
5. **switch**: only after every key is acknowledged, ``active`` points at the new generation.
   Anything failing before that leaves the previous generation serving (a killed run too).

The run is recorded (the run log: ``batch_runs`` + ``batch_offsets``) with its window, offsets,
counts, phase timings, status and error.

Idempotent: entries are a pure function of the window's events and the model (``computed_at`` is
``as_of``; duplicates of a transaction id are dropped; ties are broken by transaction id), so
running the same window twice gives the same cache contents (under a new generation id).

An empty window is a failure, not a run that succeeds with 0 entities: it means an ``--as-of``
past the events, a wrong topic prefix or file, or producers that stopped, and each of those
needs a person. Switching to an empty generation would make every card a cache miss at once;
keeping the old generation while reporting success would let it age past the cache TTL
(``FRAUDSCORE_CACHE_TTL_S``) with every run green, ``fraudscore_batch_last_success_timestamp_seconds``
fresh and no alert. So the run fails (``fraudscore nightly`` exits 2, one ``error:`` line) and the
previous generation keeps serving.

The use case takes plain values and adapters (:class:`BatchAdapters`); ``scoring_service.bootstrap``
builds them from the settings.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from scoring_service.adapters.redis.cache_writer import CacheWriteError, WriteStats, entry_items
from scoring_service.batch.metrics import BatchMetrics
from scoring_service.batch.ports import ActiveModel, CacheWriter, RunLog
from scoring_service.batch.progress import Progress
from scoring_service.batch.sources import EventSource
from scoring_service.core.cache_layout import CacheEntry
from scoring_service.core.entity_scoring import build_entries
from scoring_service.core.events import EventError, EventSourceError, Window, WindowEvents, nightly_window
from scoring_service.logging import get_logger

log = get_logger(__name__)

Entries = tuple[dict[str, CacheEntry], dict[str, CacheEntry]]  # customers, terminals


class BatchError(RuntimeError):
    """An expected failure of a batch run (no model, no Redis, Kafka unreachable, ...)."""


class EmptyWindow(BatchError):
    """The window held no valid payment: nothing to build (the module docstring says why this fails)."""


@dataclass
class BatchResult:
    run_id: int
    job: str
    status: str
    model_version: str
    generation: str
    previous_generation: str | None
    window_start: float
    window_end: float
    events_consumed: int
    dead_letters: int
    entities_scored: int
    keys_written: int
    duration_s: float
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchAdapters:
    """Where a run reads, writes and records, and the model it scores with."""

    source: EventSource
    writer: CacheWriter
    runs: RunLog
    model: ActiveModel


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def new_generation(as_of: float, run_id: int) -> str:
    return f"{_utc(as_of):%Y%m%dT%H%M%S}-r{run_id}-{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------------ the run
def run_batch(adapters: BatchAdapters, *, job: str = "nightly", as_of: float | None = None, start: float | None = None,
              show_progress: bool | None = None, metrics: BatchMetrics | None = None) -> BatchResult:
    """The pipeline for one window (see the module docstring); ``start`` overrides the window's start.
    ``metrics``: the run's gauges (batch/metrics.py; a port may serve them), else its own; kept in ``details``."""
    as_of = time.time() if as_of is None else float(as_of)
    window = nightly_window(as_of, start)
    metrics = metrics if metrics is not None else BatchMetrics(job)
    try:
        _check(adapters.source)  # fail fast, before anything is recorded or written
    except BaseException:
        metrics.failed(0.0)
        raise
    run = _Run(adapters.runs, job, adapters.model.version, window, adapters.source.name, metrics)
    try:
        with Progress(job, enabled=show_progress, observer=metrics) as prog:
            events = _nonempty(run.consumed(_read(adapters.source, window, run, prog)), window, adapters.source.name)
            customers, terminals = _build(events, as_of, adapters.model, run, prog)
            items = entry_items(adapters.model.version, run.generation, customers, terminals)
            stats = _write(adapters.writer, items, run, prog)
            previous = _switch(adapters.writer, adapters.model.version, items, run)
    except BaseException as exc:
        run.failed(exc)
        expected = _as_batch_error(exc)
        if expected is None:
            raise
        raise expected from None
    return run.succeeded(previous, entities=len(customers) + len(terminals), keys=stats.keys, offsets=events.offsets)


# ------------------------------------------------------------------------------------ the steps
def _check(source: EventSource) -> None:
    try:
        source.check()
    except EventSourceError as exc:  # unreachable, a topic missing: said before a run is recorded
        raise BatchError(f"{exc}; nothing recorded or switched, the previous cache generation keeps serving") from None


def _read(source: EventSource, window: Window, run: _Run, prog: Progress) -> WindowEvents:
    """The window's events; a source that fails part-way (a Kafka broker killed mid-read: its client raises
    its own errors, a commit "waiting for coordinator", or reads nothing more) is an EventSourceError
    that says so, never a traceback: the run is recorded failed and nothing is switched."""
    with run.timed("consume"), prog.phase("consume", None) as advance:
        try:
            return source.read_window(window.start, window.end, progress=advance)
        except EventError:  # bad events (a file that cannot be used): an input error, as it is
            raise
        except Exception as exc:
            detail = str(exc) if isinstance(exc, EventSourceError) else f"{type(exc).__name__}: {exc}"
            raise EventSourceError(f"{source.name} became unreachable or failed while the run read its events "
                                   f"({detail}); nothing switched, the previous cache generation keeps serving") from exc


def _nonempty(events: WindowEvents, window: Window, source: str) -> WindowEvents:
    """``events``, unless they hold no payment: :class:`EmptyWindow`, before anything is written."""
    if len(events.payments):
        return events
    rejected = f", {events.dead_letters} dead letters" if events.dead_letters else ""
    raise EmptyWindow(f"no payments in the window {_utc(window.start).isoformat()} to {_utc(window.end).isoformat()} "
                      f"from {source} ({events.events_consumed} events read{rejected}); nothing switched, the previous "
                      "cache generation keeps serving (an --as-of after the events, or payments no longer published?)")


def _build(events: WindowEvents, as_of: float, model: ActiveModel, run: _Run, prog: Progress) -> Entries:
    """Every entity's entry; the score phase counts the entities scored (``batch.phase_done`` items)."""
    timings: dict[str, float] = {}
    with prog.phase("score", None) as advance:
        customers, terminals = build_entries(events.payments, as_of, model.model, model.version, run.generation,
                                             typical_amount=model.typical_amount, timings=timings)
        advance(len(customers) + len(terminals))
    run.phases.update({k: round(v, 3) for k, v in timings.items()})
    return customers, terminals


def _write(writer: CacheWriter, items: list[tuple[bytes, bytes]], run: _Run, prog: Progress) -> WriteStats:
    with run.timed("write"), prog.phase("write", len(items)) as advance:
        stats = writer.write_items(items, progress=advance)
    run.details["write_keys_per_s"] = round(stats.keys_per_s) if math.isfinite(stats.keys_per_s) else None  # 0 s: no rate
    return stats


def _switch(writer: CacheWriter, model_version: str, items: list[tuple[bytes, bytes]], run: _Run) -> str | None:
    """Point ``active`` at the run's generation once a sample of its keys is there; the previous generation."""
    sample = [k for k, _ in items[:: max(1, len(items) // 50)]]
    run.metrics.enter("switch")
    with run.timed("switch"):
        return writer.switch_generation(model_version, run.generation, sample)


def _as_batch_error(exc: BaseException) -> BatchError | None:
    """The expected failures of a run, as a :class:`BatchError` (None: raise ``exc`` as it is)."""
    if isinstance(exc, CacheWriteError):
        return BatchError(f"cache write failed, generation not switched: {exc}")
    if isinstance(exc, EventSourceError):
        return BatchError(str(exc))
    return None


# ------------------------------------------------------------------------------------ the record
class _Run:
    """One run's record: its row in the run log, its generation, phase timings, counts and details."""

    def __init__(self, runs: RunLog, job: str, model_version: str, window: Window, source: str,
                 metrics: BatchMetrics) -> None:
        self.runs, self.job, self.model_version, self.window, self.metrics = runs, job, model_version, window, metrics
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.details: dict[str, Any] = {"as_of": window.end, "phases": self.phases}
        self.events_consumed = self.dead_letters = 0
        self.run_id = runs.start(job, model_version, window.start, window.end)
        metrics.started(self.run_id)
        self.generation = new_generation(window.end, self.run_id)
        runs.update(self.run_id, generation=self.generation)
        log.info("batch.start", job=job, run_id=self.run_id, generation=self.generation, model_version=model_version,
                 window_start=_utc(window.start).isoformat(), as_of=_utc(window.end).isoformat(), source=source)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.phases[phase] = round(time.perf_counter() - t, 3)
        self.metrics.phase_done(phase, self.phases[phase])

    def consumed(self, events: WindowEvents) -> WindowEvents:
        self.events_consumed, self.dead_letters = events.events_consumed, events.dead_letters
        self.metrics.consumed(self.events_consumed, self.dead_letters)
        self.details.update(events.details, dead_letter_reasons=events.dead_letter_reasons, payments=len(events.payments))
        self.runs.update(self.run_id, events_consumed=self.events_consumed, dead_letters=self.dead_letters)
        return events

    def failed(self, exc: BaseException) -> None:
        msg = str(exc) or type(exc).__name__
        log.error("batch.failed", job=self.job, run_id=self.run_id, error=msg, phases=self.phases)
        self.metrics.failed(self._duration())
        self.details["metrics"] = self.metrics.snapshot()
        try:
            self.runs.update(self.run_id, status="failed", error=msg[:4000], duration_s=self._duration(),
                             finished_at=dt.datetime.now(dt.UTC), details=self.details,
                             events_consumed=self.events_consumed, dead_letters=self.dead_letters)
        except Exception:  # the database may be the thing that failed
            pass

    def succeeded(self, previous: str | None, *, entities: int, keys: int,
                  offsets: list[tuple[str, int, int, int]]) -> BatchResult:
        self.phases["total"] = duration = self._duration()
        self.details["previous_generation"] = previous
        self.metrics.succeeded(duration_s=duration, entities=entities, keys=keys, phases=self.phases)
        self.details["metrics"] = self.metrics.snapshot()
        result = BatchResult(
            run_id=self.run_id, job=self.job, status="succeeded", model_version=self.model_version,
            generation=self.generation, previous_generation=previous, window_start=self.window.start,
            window_end=self.window.end, events_consumed=self.events_consumed, dead_letters=self.dead_letters,
            entities_scored=entities, keys_written=keys, duration_s=duration, phases=self.phases, details=self.details,
        )
        self.runs.update(self.run_id, status="succeeded", events_consumed=self.events_consumed,
                         dead_letters=self.dead_letters, entities_scored=entities, keys_written=keys, duration_s=duration,
                         finished_at=dt.datetime.now(dt.UTC), details=self.details, offsets=offsets)
        log.info("batch.done", job=self.job, run_id=self.run_id, generation=self.generation, previous=previous,
                 events=self.events_consumed, dead_letters=self.dead_letters, entities=entities, keys=keys,
                 seconds=duration, phases=self.phases)
        return result

    def _duration(self) -> float:
        return round(time.perf_counter() - self.started, 3)
