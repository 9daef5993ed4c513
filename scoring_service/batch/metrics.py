"""Prometheus metrics of one batch run (``fraudscore nightly``, ``fraudscore replay``).

A batch job is a short-lived process, so there is no pushgateway: with
``FRAUDSCORE_BATCH_METRICS_PORT`` (``--metrics-port``) the run serves ``/metrics`` while it runs
(:class:`MetricsExporter`), and after the end keeps the port open until one more scrape has read
the final values (at most ``FRAUDSCORE_BATCH_METRICS_LINGER_S``). Whether or not a port is
served, the final values are kept in the run's JSON and its ``batch_runs`` record
(``details["metrics"]``, :meth:`BatchMetrics.snapshot`).

Every metric is a gauge labelled ``batch`` (the job: ``nightly`` / ``replay``), in a registry of
its own (no process or GC collectors): one process runs one job, and Prometheus adds the target.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.core import Metric

__all__ = ["PHASES", "BatchMetrics", "MetricsExporter", "MetricsPortError"]

# the values of fraudscore_batch_phase{phase=...}, in the order a run goes through them
PHASES = ("starting", "consume", "score", "write", "switch", "succeeded", "failed")


class BatchMetrics:
    """The gauges of one run; the pipeline calls :meth:`started` ... :meth:`succeeded` / :meth:`failed`."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.registry = CollectorRegistry(auto_describe=True)
        self._t0 = time.perf_counter()
        self._final_duration: float | None = None
        self.phase_name = "starting"
        r, lb = self.registry, ["batch"]
        self._duration = Gauge("fraudscore_batch_run_duration_seconds",
                               "Seconds since the run started; after the end, the run's duration.", lb, registry=r)
        self._duration.labels(job).set_function(self._elapsed)
        self._start_ts = Gauge("fraudscore_batch_run_start_timestamp_seconds", "Unix time the run started.", lb,
                               registry=r)
        self._start_ts.labels(job).set(time.time())
        self._run_id = Gauge("fraudscore_batch_run_id", "The run's id in batch_runs.", lb, registry=r)
        self._events = Gauge("fraudscore_batch_events_consumed",
                             "Events (payments and labels) read so far from the window.", lb, registry=r)
        self._dead = Gauge("fraudscore_batch_dead_letters", "Events rejected as dead letters.", lb, registry=r)
        self._entities = Gauge("fraudscore_batch_entities", "Entities (customers and terminals) scored.", lb,
                               registry=r)
        self._keys = Gauge("fraudscore_batch_keys_written", "Cache keys of the new generation written so far.", lb,
                           registry=r)
        self._switch = Gauge("fraudscore_batch_generation_switch_seconds",
                             "Seconds the switch to the new generation took.", lb, registry=r)
        self._switch_ts = Gauge("fraudscore_batch_generation_switch_timestamp_seconds",
                                "Unix time the new generation became active.", lb, registry=r)
        self._last_success = Gauge("fraudscore_batch_last_success_timestamp_seconds",
                                   "Unix time the run succeeded (absent until it does).", lb, registry=r)
        self._phase = Gauge("fraudscore_batch_phase", "1 for the phase the run is in, 0 for the others.",
                            ["batch", "phase"], registry=r)
        self._phase_s = Gauge("fraudscore_batch_phase_seconds", "Seconds each finished phase took.",
                              ["batch", "phase"], registry=r)
        for name in (self._events, self._dead, self._entities, self._keys):
            name.labels(job).set(0)
        self.enter("starting")

    # ---------------------------------------------------------------------------- the run's steps
    def started(self, run_id: int) -> None:
        self._run_id.labels(self.job).set(run_id)

    def enter(self, phase: str) -> None:
        """The run is now in ``phase`` (one of :data:`PHASES`; entering the current one again is a no-op)."""
        self.phase_name = phase
        for p in PHASES:
            self._phase.labels(self.job, p).set(1 if p == phase else 0)

    def advanced(self, phase: str, k: int) -> None:
        """``k`` more items done in ``phase``: events read (consume), keys written (write)."""
        if phase == "consume":
            self._events.labels(self.job).inc(k)
        elif phase == "write":
            self._keys.labels(self.job).inc(k)

    def consumed(self, events: int, dead_letters: int) -> None:
        self._events.labels(self.job).set(events)
        self._dead.labels(self.job).set(dead_letters)

    def phase_done(self, phase: str, seconds: float) -> None:
        self._phase_s.labels(self.job, phase).set(seconds)
        if phase == "switch":  # the new generation is active from now on
            self._switch.labels(self.job).set(seconds)
            self._switch_ts.labels(self.job).set(time.time())

    def succeeded(self, *, duration_s: float, entities: int, keys: int, phases: dict[str, float]) -> None:
        now = time.time()
        self._entities.labels(self.job).set(entities)
        self._keys.labels(self.job).set(keys)
        for phase, seconds in phases.items():
            if phase != "total":
                self._phase_s.labels(self.job, phase).set(seconds)
        self._last_success.labels(self.job).set(now)
        self._final_duration = duration_s
        self.enter("succeeded")

    def failed(self, duration_s: float) -> None:
        self._final_duration = duration_s
        self.enter("failed")

    def _elapsed(self) -> float:
        return self._final_duration if self._final_duration is not None else round(time.perf_counter() - self._t0, 3)

    # ---------------------------------------------------------------------------- reading it back
    def snapshot(self) -> dict[str, float]:
        """Every sample as ``name`` or ``name{label="value"}`` (the ``batch`` label left out) -> value:
        what a scrape shows now, kept in the run's JSON and record."""
        return samples_by_key(self.registry.collect(), self.job)


def samples_by_key(families: Any, job: str) -> dict[str, float]:
    """``name[{labels}]`` -> value for the samples of ``job`` in metric families (collected or parsed from a scrape)."""
    out: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.labels.get("batch") != job:
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "batch")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


# -------------------------------------------------------------------------------- the port
class MetricsPortError(RuntimeError):
    """The metrics port cannot be listened on (in use, not allowed)."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _ScrapeWatch:
    """A collector that exports nothing and notes the first scrape once the run has ended."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.scraped_after_end = threading.Event()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        if self.ended.is_set():
            self.scraped_after_end.set()
        return []


class MetricsExporter:
    """``with MetricsExporter(metrics, port) as m:`` serves ``/metrics`` while the block runs; on leaving
    it, waits (at most ``linger_s``) for one scrape of the final values, then closes the port.

    One request at a time (scrapes are small): closing waits for the scrape being answered."""

    def __init__(self, metrics: BatchMetrics, port: int, addr: str = "0.0.0.0", linger_s: float = 30.0) -> None:
        self.metrics, self.linger_s = metrics, linger_s
        self._watch = _ScrapeWatch()
        metrics.registry.register(self._watch)
        try:
            self._server: WSGIServer = make_server(addr, port, make_wsgi_app(metrics.registry),
                                                   handler_class=_QuietHandler)
        except (OSError, OverflowError) as exc:
            raise MetricsPortError(f"metrics port {addr}:{port}: cannot listen ({exc})") from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="batch-metrics", daemon=True)

    def __enter__(self) -> BatchMetrics:
        self._thread.start()
        return self.metrics

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._watch.ended.set()
        try:
            if exc_type is not KeyboardInterrupt and self.linger_s > 0:
                self._watch.scraped_after_end.wait(self.linger_s)
        finally:
            self._server.shutdown()  # returns once the scrape being answered (if any) is written
            self._server.server_close()
