"""The nightly batch: rebuild every entity's cache entry from the events of the feature window.

Steps, each timed and recorded in ``batch_runs.details["phases"]``:

1. **window**: ``as_of`` (default now) minus 30 days + the label delay; resolved to
   offsets per partition of ``<prefix>.payments`` and ``<prefix>.labels`` with
   ``offsets_for_times`` ([first offset at or after start, first offset at or after as_of)).
2. **consume**: read exactly those offsets (stop at the as_of offsets, never at "quiet for a
   while"); decode and validate; bad events go to ``<prefix>.dead-letter`` with the reason and
   are counted - a run never stops for them.
3. **features / score / explain**: ``scoring_service.entity_scoring.build_entries`` (the one
   definition of entity risk) with the active model of the registry.
4. **write**: every entry under a fresh generation (``cache_writer``; TTL = ``cache_ttl_s``).
5. **switch**: only after every key is acknowledged, ``active`` points at the new generation.
   Anything failing before that leaves the previous generation serving (a killed run too).

The run is recorded in ``batch_runs`` (+ ``batch_offsets`` per topic partition) with its window,
offsets, counts, phase timings, status and error.

Idempotent: entries are a pure function of the window's events and the model (``computed_at`` is
``as_of``; duplicates of a transaction id are dropped; ties are broken by transaction id), so
running the same window twice gives the same cache contents (under a new generation id).

Scale-out (``--workers N``): N consumer processes in one consumer group split the *partitions*
(worker i reads the i-th share of the sorted partitions of both topics; payments and labels are
keyed by customer, so a customer's events and labels are in the same partition number) and do the
per-event work: fetch, decode, validate, dead-letter, commit the group's offsets. Terminals span
partitions, and a payment's terminal features need every partition's payments of that terminal,
so the coordinator merges the workers' decoded frames and computes features, scores and entities
(customers and terminals) once. The per-event part is what grows with traffic; the merged frame
of a 44-day window is a few hundred MB at most for millions of events.

Without Kafka configured, events come from a local file (``--source FILE`` or
``FRAUDSCORE_EVENTS_FILE``) with the same window and label-arrival rules.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy.orm import Session

from scoring_service.batch import events as ev
from scoring_service.batch.progress import Progress
from scoring_service.config import Settings
from scoring_service.adapters.sql.db import BatchOffset, BatchRun, make_engine, upgrade_schema
from scoring_service.core.features import LABEL_DELAY_DAYS, epoch_seconds
from scoring_service.logging import get_logger

log = get_logger(__name__)

DAY_S = 86400.0
FEATURE_WINDOW_DAYS = 30


class BatchError(RuntimeError):
    """An expected failure of a batch run (no model, no Redis, Kafka unreachable, ...)."""


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


def window_for(as_of: float) -> tuple[float, float]:
    """[start, end) in epoch seconds: the feature windows (30 d + label delay) before ``as_of``."""
    return as_of - (FEATURE_WINDOW_DAYS + LABEL_DELAY_DAYS) * DAY_S, as_of


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def new_generation(as_of: float, run_id: int) -> str:
    return f"{_utc(as_of):%Y%m%dT%H%M%S}-r{run_id}-{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------------ run records
class RunRecorder:
    def __init__(self, settings: Settings) -> None:
        url = settings.resolved_database_url()
        upgrade_schema(url)
        self.engine = make_engine(url)

    def start(self, job: str, model_version: str, start: float, end: float) -> int:
        with Session(self.engine) as s, s.begin():
            row = BatchRun(job=job, status="running", model_version=model_version, generation="",
                           window_start=_utc(start), window_end=_utc(end), details={})
            s.add(row)
            s.flush()
            return row.id

    def update(self, run_id: int, **fields: Any) -> None:
        offsets = fields.pop("offsets", None)
        with Session(self.engine) as s, s.begin():
            row = s.get(BatchRun, run_id)
            assert row is not None
            for k, v in fields.items():
                setattr(row, k, v)
            if offsets:
                for topic, part, start, end in offsets:
                    s.add(BatchOffset(run_id=run_id, topic=topic, partition=part, start_offset=start, end_offset=end))


# ------------------------------------------------------------------------------------ consuming
@dataclass
class Consumed:
    payments: pd.DataFrame  # normalised, not yet labelled
    labels: pd.DataFrame
    events: int
    dead_letters: int
    reasons: dict[str, int]
    offsets: list[tuple[str, int, int, int]]
    workers: list[dict[str, Any]]


def _consume_share(bootstrap: str, pay_ranges: list, lab_ranges: list, group_id: str, dl_topic: str,
                   job: str, start: float, end: float, worker: int, show: bool) -> dict[str, Any]:
    """One worker's share: read, decode, validate, dead-letter (runs in a child process or inline)."""
    from scoring_service.adapters.kafka import kafka_io

    started = time.perf_counter()
    prog = Progress(job, enabled=show)
    with prog, prog.phase(f"consume[{worker}]", sum(r.count for r in pay_ranges + lab_ranges)) as adv:
        decoded = ev.decode_payments(kafka_io.read_ranges(bootstrap, pay_ranges, group_id, progress=adv))
        labels, lab_rejected = ev.decode_labels(kafka_io.read_ranges(bootstrap, lab_ranges, group_id, progress=adv))
    # The offsets come from message timestamps; the window itself is about payment times.
    ts = decoded.frame["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64") / 1e9
    payments = decoded.frame.loc[(ts >= start) & (ts < end)]
    labels = labels.loc[labels["labelled_at_s"] < end]
    rejected = decoded.rejected + lab_rejected
    reasons: dict[str, int] = {}
    if rejected:
        dlp = kafka_io.DeadLetterProducer(bootstrap, dl_topic, job)
        dlp.send(rejected)
        dlp.flush()
        for r in rejected:
            key = r.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "worker": worker,
        "payments": payments,
        "labels": labels,
        "events": sum(r.count for r in pay_ranges + lab_ranges),
        "dead_letters": len(rejected),
        "reasons": reasons,
        "partitions": sorted({r.partition for r in pay_ranges}),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _child(args: tuple, conn: Any) -> None:
    try:
        conn.send(("ok", _consume_share(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def split_partitions(partitions: list[int], workers: int) -> list[list[int]]:
    """Contiguous shares of the sorted partitions (Kafka's range assignor)."""
    parts = sorted(partitions)
    n = max(1, min(workers, len(parts))) if parts else 1
    q, r = divmod(len(parts), n)
    out, i = [], 0
    for w in range(n):
        k = q + (1 if w < r else 0)
        out.append(parts[i: i + k])
        i += k
    return out


def consume_kafka(settings: Settings, pay_ranges: list, lab_ranges: list, *, group_id: str, workers: int,
                  job: str, start: float, end: float, show_progress: bool | None) -> Consumed:
    from scoring_service.adapters.kafka import kafka_io

    bootstrap = settings.kafka_bootstrap or ""
    kafka_io.ensure_topics(bootstrap, [settings.topic("dead-letter")],
                           partitions=max(1, len(pay_ranges)))
    shares = split_partitions([r.partition for r in pay_ranges], workers)
    jobs = []
    for w, parts in enumerate(shares):
        jobs.append((bootstrap, [r for r in pay_ranges if r.partition in parts],
                     [r for r in lab_ranges if r.partition in parts], group_id, settings.topic("dead-letter"),
                     job, start, end, w, show_progress if len(shares) == 1 else False))
    if len(jobs) == 1:
        results = [_consume_share(*jobs[0])]
    else:
        ctx = multiprocessing.get_context("fork")
        procs = []
        for args in jobs:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(args, child), daemon=True)
            p.start()
            child.close()
            procs.append((p, parent))
        results = []
        errors = []
        for p, parent in procs:
            try:
                status, payload = parent.recv()
            except EOFError:
                status, payload = "error", f"worker exited with {p.exitcode}"
            p.join()
            (results if status == "ok" else errors).append(payload)
        if errors:
            raise BatchError(f"consumer worker failed: {errors[0]}")
    payments = pd.concat([r["payments"] for r in results], ignore_index=True)
    labels = pd.concat([r["labels"] for r in results], ignore_index=True)
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    offsets = [(r.topic, r.partition, r.start, r.end) for r in pay_ranges + lab_ranges]
    return Consumed(payments, labels, sum(r["events"] for r in results), sum(r["dead_letters"] for r in results),
                    reasons, offsets,
                    [{k: r[k] for k in ("worker", "partitions", "events", "dead_letters", "seconds")} for r in results])


# ------------------------------------------------------------------------------------ the run
def _load_model(settings: Settings) -> tuple[Any, Any]:
    from scoring_service.adapters.sql.registry import Registry

    engine = make_engine(settings.resolved_database_url())
    upgrade_schema(settings.resolved_database_url())
    record = Registry(engine).active()
    if record is None:
        raise BatchError("no active model in the registry: train one first (`fraudscore train`)")
    from scoring_service.adapters.model.gbdt import GbdtModel, ModelError

    try:
        model = GbdtModel.load(record.artifact_path, record.framework, record.feature_names,
                               expected_sha256=record.sha256, device=settings.device, nthread=os.cpu_count() or 1)
    except ModelError as exc:
        raise BatchError(f"cannot load model {record.version}: {exc}") from None
    return record, model


def _redis_url(settings: Settings, redis_url: str | None) -> str:
    if redis_url:
        return redis_url
    from scoring_service.adapters.redis.embedded import NoRedisError, resolve_redis_url

    try:
        return resolve_redis_url(settings)
    except NoRedisError as exc:
        raise BatchError(str(exc)) from None


def run_batch(
    settings: Settings,
    *,
    job: str = "nightly",
    as_of: float | None = None,
    start: float | None = None,
    group_id: str | None = None,
    workers: int = 1,
    payments: pd.DataFrame | None = None,
    source: str | Path | None = None,
    offsets_from: dict[int, int] | None = None,
    offsets_to: dict[int, int] | None = None,
    redis_url: str | None = None,
    model: tuple[Any, Any] | None = None,
    show_progress: bool | None = None,
    write_connections: int = 4,
) -> BatchResult:
    """The nightly pipeline for one window; shared by ``nightly``, ``replay`` and ``rebuild_cache``.

    Events come from ``payments`` (an in-memory normalised frame), else Kafka when
    ``settings.kafka_bootstrap`` is set, else the local file ``source``. ``offsets_from`` /
    ``offsets_to`` (partition -> offset, Kafka only) override the time-resolved window ends.
    """
    from scoring_service.adapters.redis import cache_writer

    t_run = time.perf_counter()
    as_of = time.time() if as_of is None else float(as_of)
    w_start, w_end = window_for(as_of)
    if start is not None:
        w_start = float(start)
    phases: dict[str, float] = {}
    use_kafka = payments is None and bool(settings.kafka_bootstrap)
    if payments is None and not use_kafka and source is None:
        source = os.environ.get("FRAUDSCORE_EVENTS_FILE")
        if not source:
            raise BatchError("no event source: set KAFKA_BOOTSTRAP_SERVERS, or pass --source FILE "
                             "(or FRAUDSCORE_EVENTS_FILE) to read events from a parquet file")
    if use_kafka:  # fail fast, before anything is recorded or written
        from scoring_service.adapters.kafka import kafka_io

        try:
            kafka_io.check_reachable(settings.kafka_bootstrap or "")
        except kafka_io.KafkaUnavailable as exc:
            raise BatchError(str(exc)) from None
    url = _redis_url(settings, redis_url)
    record, mdl = model if model is not None else _load_model(settings)
    recorder = RunRecorder(settings)
    run_id = recorder.start(job, record.version, w_start, w_end)
    generation = new_generation(as_of, run_id)
    recorder.update(run_id, generation=generation)
    log.info("batch.start", job=job, run_id=run_id, generation=generation, model_version=record.version,
             window_start=_utc(w_start).isoformat(), as_of=_utc(as_of).isoformat(),
             source="frame" if payments is not None else ("kafka" if use_kafka else str(source)))
    events_consumed = dead_letters = 0
    details: dict[str, Any] = {"as_of": as_of, "phases": phases}
    try:
        with Progress(job, enabled=show_progress) as prog:
            # ---- consume
            t = time.perf_counter()
            offsets: list[tuple[str, int, int, int]] = []
            if use_kafka:
                from scoring_service.adapters.kafka import kafka_io

                bootstrap = settings.kafka_bootstrap or ""
                try:
                    pay_ranges = kafka_io.resolve_window(bootstrap, settings.topic("payments"),
                                                         int(w_start * 1000), int(w_end * 1000))
                    lab_ranges = kafka_io.resolve_window(bootstrap, settings.topic("labels"),
                                                         int(w_start * 1000), int(w_end * 1000))
                except kafka_io.KafkaUnavailable as exc:
                    raise BatchError(str(exc)) from None
                if offsets_from or offsets_to:
                    pay_ranges = [kafka_io.PartitionRange(r.topic, r.partition,
                                                          (offsets_from or {}).get(r.partition, r.start),
                                                          (offsets_to or {}).get(r.partition, r.end))
                                  for r in pay_ranges]
                consumed = consume_kafka(settings, pay_ranges, lab_ranges, group_id=group_id or f"fraudscore-{job}",
                                         workers=workers, job=job, start=w_start, end=w_end,
                                         show_progress=prog.tty)
                frame = ev.attach_labels(consumed.payments, consumed.labels)
                events_consumed, dead_letters = consumed.events, consumed.dead_letters
                offsets = consumed.offsets
                details.update(workers=consumed.workers, dead_letter_reasons=consumed.reasons,
                               labels=len(consumed.labels))
            else:
                base = payments if payments is not None else ev.FileEventSource(source).frame()  # type: ignore[arg-type]
                we = ev.window_from_frame(base, w_start, w_end, LABEL_DELAY_DAYS)
                frame = we.payments
                events_consumed, dead_letters = we.events_consumed, len(we.rejected)
                details["source"] = "frame" if payments is not None else str(source)
            phases["consume"] = round(time.perf_counter() - t, 3)
            details["payments"] = len(frame)
            recorder.update(run_id, events_consumed=events_consumed, dead_letters=dead_letters)

            # ---- features, score, explain
            from scoring_service.core.entity_scoring import build_entries

            timings: dict[str, float] = {}
            with prog.phase("score", None):
                customers, terminals = build_entries(frame, as_of, mdl, record.version, generation, timings=timings)
            phases.update({k: round(v, 3) for k, v in timings.items()})

            # ---- write
            t = time.perf_counter()
            items = cache_writer.entry_items(record.version, generation, customers, terminals)
            delay = float(os.environ.get("FRAUDSCORE_TEST_WRITE_DELAY_S", "0") or 0)  # tests: a slow write to kill
            with prog.phase("write", len(items)) as adv:
                stats = cache_writer.write_items(
                    url, items, settings.cache_ttl_s, connections=write_connections, progress=adv,
                    chunk=200 if delay else 5000, after_chunk=(lambda _n: time.sleep(delay)) if delay else None,
                )
            phases["write"] = round(time.perf_counter() - t, 3)
            details["write_keys_per_s"] = round(stats.keys_per_s)

            # ---- switch
            t = time.perf_counter()
            sample = [k for k, _ in items[:: max(1, len(items) // 50)]]
            previous = cache_writer.switch_generation(url, record.version, generation, sample=sample)
            phases["switch"] = round(time.perf_counter() - t, 3)
    except BaseException as exc:
        duration = time.perf_counter() - t_run
        msg = str(exc) or type(exc).__name__
        log.error("batch.failed", job=job, run_id=run_id, error=msg, phases=phases)
        try:
            recorder.update(run_id, status="failed", error=msg[:4000], duration_s=round(duration, 3),
                            finished_at=dt.datetime.now(dt.UTC), details=details,
                            events_consumed=events_consumed, dead_letters=dead_letters)
        except Exception:  # the database may be the thing that failed
            pass
        if isinstance(exc, (BatchError, KeyboardInterrupt, SystemExit)):
            raise
        from scoring_service.adapters.redis.cache_writer import CacheWriteError

        if isinstance(exc, CacheWriteError):
            raise BatchError(f"cache write failed, generation not switched: {exc}") from None
        raise
    duration = time.perf_counter() - t_run
    phases["total"] = round(duration, 3)
    details["previous_generation"] = previous
    result = BatchResult(
        run_id=run_id, job=job, status="succeeded", model_version=record.version, generation=generation,
        previous_generation=previous, window_start=w_start, window_end=w_end, events_consumed=events_consumed,
        dead_letters=dead_letters, entities_scored=len(customers) + len(terminals), keys_written=stats.keys,
        duration_s=round(duration, 3), phases=phases, details=details,
    )
    recorder.update(run_id, status="succeeded", events_consumed=events_consumed, dead_letters=dead_letters,
                    entities_scored=result.entities_scored, keys_written=stats.keys, duration_s=result.duration_s,
                    finished_at=dt.datetime.now(dt.UTC), details=details, offsets=offsets)
    log.info("batch.done", job=job, run_id=run_id, generation=generation, previous=previous,
             events=events_consumed, dead_letters=dead_letters, entities=result.entities_scored,
             keys=stats.keys, seconds=result.duration_s, phases=phases)
    return result


def run_nightly(settings: Settings, *, as_of: float | None = None, group_id: str | None = None, workers: int = 1,
                source: str | Path | None = None, redis_url: str | None = None, show_progress: bool | None = None) -> BatchResult:
    return run_batch(settings, job="nightly", as_of=as_of, group_id=group_id or "fraudscore-nightly",
                     workers=workers, source=source, redis_url=redis_url,
                     show_progress=show_progress)


def rebuild_cache(payments: pd.DataFrame, as_of: Any, settings: Settings, *, redis_url: str | None = None, model: tuple[Any, Any] | None = None, job: str = "rebuild",
                  show_progress: bool | None = False) -> BatchResult:
    """The nightly run on an in-memory normalised payments frame (benchmarks, tests; no Kafka).

    ``payments`` may hold labels for every payment: only those that had arrived by ``as_of``
    (payment time + the label delay) are used, as on Kafka.
    """
    return run_batch(settings, job=job, as_of=epoch_seconds(as_of), payments=payments,
                     redis_url=redis_url, model=model, show_progress=show_progress)
