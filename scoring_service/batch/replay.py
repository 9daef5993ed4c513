"""Replay recorded events: rebuild/backfill the cache for a window, or drive the live service.

``fraudscore replay --from A --to B`` rebuilds the cache as of B from the events in [A, B) with
the nightly pipeline itself (``pipeline.run_batch``: same window rules, dead letters, generation
switch, run record; job ``replay``). A and B are times, or ``partition:offset[,partition:offset]``
bounds on the payments topic (partitions not named read from their start / to their end; with an
offset ``--to``, as_of is the newest payment read); offsets need a source that has them (Kafka).

``--through-service ADDRESS --speed X`` instead sends the window's payments as ``Score()`` calls
at X times their original pace (0 = as fast as possible, ``--concurrency`` in flight), joins the
answers with the labels and reports served average precision, Card Precision@100 per day, the
cache hit ratio and latency percentiles (JSON and a table).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.batch.metrics import BatchMetrics
from scoring_service.batch.pipeline import BatchAdapters, BatchError, BatchResult, run_batch
from scoring_service.batch.progress import Progress
from scoring_service.batch.sources import EventSource, OffsetBoundedSource
from scoring_service.core import drift
from scoring_service.core.events import DAY_S, EventSourceError
from scoring_service.core.features import LABEL_DELAY_DAYS, epoch_seconds
from scoring_service.core.metrics import average_precision, card_precision_at_k, card_precision_per_day
from scoring_service.logging import get_logger

log = get_logger(__name__)

__all__ = ["Bound", "card_precision_per_day", "check_bounds", "parse_bound", "replay_cache", "replay_through_service",
           "report_table", "summarise"]


@dataclass
class Bound:
    time: float | None = None
    offsets: dict[int, int] | None = None


def parse_offset_spec(spec: str) -> tuple[int, int] | None:
    """``partition:offset`` -> (partition, offset); None when it is not of that form."""
    if ":" not in spec:
        return None
    p, _, o = spec.partition(":")
    if p.isdigit() and o.lstrip("-").isdigit():
        return int(p), int(o)
    return None


def parse_bound(spec: str | None) -> Bound:
    """A time (ISO 8601 / date / epoch seconds) or ``p:o[,p:o...]``."""
    if spec is None or spec == "":
        return Bound()
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    parsed = [parse_offset_spec(p) for p in parts]
    if parts and all(p is not None for p in parsed):
        return Bound(offsets=dict(p for p in parsed if p is not None))
    try:
        return Bound(time=epoch_seconds(spec))
    except (ValueError, TypeError) as exc:
        raise BatchError(f"bad time or partition:offset {spec!r}: {exc}") from None


def _bounded(source: EventSource, a: Bound, b: Bound) -> EventSource:
    """``source`` with the payments bounded by the offsets of ``a``/``b`` (if any)."""
    if not (a.offsets or b.offsets):
        return source
    if not isinstance(source, OffsetBoundedSource):
        raise BatchError("partition:offset bounds need Kafka (KAFKA_BOOTSTRAP_SERVERS)")
    return source.with_offsets(a.offsets, b.offsets)


def _as_of(source: EventSource, b: Bound) -> float:
    """The end of the replayed window: the ``--to`` time, just after the newest payment before the
    ``--to`` offsets, else now."""
    if b.time is not None:
        return b.time
    if not b.offsets:
        return time.time()
    assert isinstance(source, OffsetBoundedSource)
    try:
        newest = source.newest_payment_time(b.offsets)
    except EventSourceError as exc:
        raise BatchError(str(exc)) from None
    if newest is None:
        raise BatchError("the --to offsets point at no message: nothing to replay")
    return newest + 0.001


def check_bounds(source: EventSource, frm: str | None, to: str | None) -> None:
    """Raise :class:`BatchError` for bounds that cannot be replayed from ``source`` (before adapters are built)."""
    _bounded(source, parse_bound(frm), parse_bound(to))


def replay_cache(adapters: BatchAdapters, frm: str | None, to: str | None, *,
                 show_progress: bool | None = None, metrics: BatchMetrics | None = None) -> BatchResult:
    """Rebuild the cache as of ``to`` from the events in [``frm``, ``to``) (nightly's pipeline)."""
    a, b = parse_bound(frm), parse_bound(to)
    source = _bounded(adapters.source, a, b)
    as_of = _as_of(source, b)
    start = 0.0 if a.offsets else a.time  # offsets bound the payments; the time window must not cut them off
    if start is not None and start >= as_of:
        raise BatchError("--from must be before --to")
    return run_batch(dataclasses.replace(adapters, source=source), job="replay", as_of=as_of, start=start,
                     show_progress=show_progress, metrics=metrics)


# ------------------------------------------------------------------------------------ metrics
def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def summarise(payments: pd.DataFrame, answers: list[dict[str, Any]], drift_reference: dict[str, Any] | None = None,
              drift_threshold: float = drift.DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Join answers (one per payment, same order) with labels and compute the served metrics; with the
    model's training profile (``drift_reference``), the PSI per day of the amount and of the score."""
    df = payments[["transaction_id", "customer_id", "timestamp", "is_fraud"]].reset_index(drop=True).copy()
    df["score"] = [a.get("risk_score", np.nan) for a in answers]
    df["source"] = [a.get("source", "ERROR") for a in answers]
    ok = df["source"] != "ERROR"
    labelled = ok & (df["is_fraud"] >= 0)
    y = (df.loc[labelled, "is_fraud"] == 1).astype(int).to_numpy()
    s = df.loc[labelled, "score"].to_numpy(dtype=np.float64)
    ap = float(average_precision(y, s)) if y.sum() > 0 else float("nan")
    per_day = card_precision_per_day(df.loc[labelled])
    cp = card_precision_at_k(df.loc[labelled], k=100)
    sources = df["source"].value_counts().to_dict()
    n_ok = int(ok.sum())
    lat = [a["client_latency_ms"] for a in answers if "client_latency_ms" in a and a.get("source") != "ERROR"]
    srv = [a["latency_ms"] for a in answers if "latency_ms" in a and a.get("source") != "ERROR"]
    drift_per_day = drift.psi_by_day(
        drift_reference, [str(d.date()) for d in pd.to_datetime(df.loc[ok, "timestamp"])],
        {"amount": payments["amount"].to_numpy()[ok.to_numpy()], drift.SCORE: df.loc[ok, "score"].to_numpy()},
        drift_threshold) if drift_reference else None
    return {
        "drift_per_day": drift_per_day,
        "requests": len(answers),
        "errors": int((~ok).sum()),
        "degraded": int(sum(1 for a in answers if a.get("degraded"))),
        "labelled": int(labelled.sum()),
        "frauds": int(y.sum()),
        "average_precision": ap,
        "card_precision_at_100": cp,
        "card_precision_at_100_per_day": per_day,
        "cache_hit_ratio": (sources.get("CACHE", 0) / n_ok) if n_ok else 0.0,
        "sources": {str(k): int(v) for k, v in sources.items()},
        "latency_ms": _percentiles(lat),
        "server_latency_ms": _percentiles(srv),
    }


# ------------------------------------------------------------------------------------ through the service
async def _drive(address: str, payments: pd.DataFrame, speed: float, concurrency: int, timeout_s: float,
                 progress: Any = None, *, open_channel: Callable[[str], Any] | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> list[dict[str, Any]]:
    """Score() calls for ``payments``; ``open_channel`` (address -> grpc.aio channel) for TLS, ``metadata`` for a key."""
    import grpc

    from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

    answers: list[dict[str, Any]] = [{} for _ in range(len(payments))]
    ts = payments["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64")
    rows = list(zip(payments["transaction_id"].tolist(), payments["customer_id"].tolist(),
                    payments["terminal_id"].tolist(), payments["amount"].tolist(), ts.tolist(), strict=True))
    sem = asyncio.Semaphore(max(1, concurrency))
    Source = scoring_pb2.Source
    Decision = scoring_pb2.Decision
    async with (open_channel(address) if open_channel else grpc.aio.insecure_channel(address)) as channel:
        stub = scoring_pb2_grpc.FraudScoringStub(channel)

        async def one(i: int, row: tuple) -> None:
            tx, cu, te, am, ns = row
            req = scoring_pb2.ScoreRequest(request_id=f"replay-{tx}", transaction=scoring_pb2.Transaction(
                transaction_id=tx, customer_id=cu, terminal_id=te, amount=am))
            req.transaction.timestamp.FromNanoseconds(int(ns))
            t0 = time.perf_counter()
            try:
                resp = await stub.Score(req, timeout=timeout_s, metadata=metadata or None)
                answers[i] = {"risk_score": resp.risk_score, "decision": Decision.Name(resp.decision),
                              "source": Source.Name(resp.source), "degraded": resp.degraded,
                              "latency_ms": resp.latency_ms, "client_latency_ms": (time.perf_counter() - t0) * 1000}
            except grpc.aio.AioRpcError as exc:
                answers[i] = {"source": "ERROR", "error": exc.code().name}
            finally:
                sem.release()
                if progress:
                    progress(1)

        tasks = []
        wall0 = time.monotonic()
        t_first = ts[0] / 1e9 if len(ts) else 0.0
        for i, row in enumerate(rows):
            if speed > 0:
                due = wall0 + (row[4] / 1e9 - t_first) / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(asyncio.create_task(one(i, row)))
        if tasks:
            await asyncio.gather(*tasks)
    return answers


def replay_through_service(source: EventSource, address: str, frm: str | None, to: str | None, *,
                           speed: float = 0.0, concurrency: int = 32, limit: int | None = None, timeout_s: float = 2.0,
                           show_progress: bool | None = None, drift_reference: dict[str, Any] | None = None,
                           open_channel: Callable[[str], Any] | None = None,
                           metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """Send the window's payments to ``address`` as Score() calls; the served metrics (with the drift per day
    against ``drift_reference``, the active version's training profile)."""
    a, b = parse_bound(frm), parse_bound(to)
    if a.offsets or b.offsets:
        raise BatchError("--through-service takes times for --from/--to")
    end = b.time if b.time is not None else time.time()
    start = a.time if a.time is not None else end - DAY_S
    try:
        source.check()
        # every label of the window, whenever it arrived (the answers are judged afterwards)
        payments = source.read_window(start, end, labels_until=end + (LABEL_DELAY_DAYS + 1) * DAY_S).payments
    except EventSourceError as exc:
        raise BatchError(str(exc)) from None
    if limit:
        payments = payments.head(limit)
    started = time.perf_counter()
    with Progress("replay", enabled=show_progress) as prog, prog.phase("score", len(payments)) as adv:
        answers = asyncio.run(_drive(address, payments, speed, concurrency, timeout_s, adv,
                                     open_channel=open_channel, metadata=metadata))
    wall = time.perf_counter() - started
    report = summarise(payments, answers, drift_reference)
    report.update(address=address, speed=speed, concurrency=concurrency, seconds=round(wall, 3),
                  requests_per_s=round(len(answers) / wall, 1) if wall > 0 else None)
    return report


def report_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"replay through {report.get('address')}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("requests", "errors", "degraded", "labelled", "frauds", "requests_per_s"):
        t.add_row(k, str(report.get(k)))
    t.add_row("average precision", f"{report['average_precision']:.4f}")
    t.add_row("Card Precision@100", f"{report['card_precision_at_100']:.4f}")
    t.add_row("cache hit ratio", f"{report['cache_hit_ratio']:.3f}")
    for q, v in report["latency_ms"].items():
        t.add_row(f"latency {q} (ms)", f"{v:.2f}")
    for day, v in report["card_precision_at_100_per_day"].items():
        t.add_row(f"CP@100 {day}", f"{v:.2f}")
    for day, d in (report.get("drift_per_day") or {}).items():
        t.add_row(f"PSI {day}", f"amount {d.get('amount', float('nan')):.3f}  score {d.get('score', float('nan')):.3f}"
                  + (f"  flagged {','.join(d['flagged'])}" if d["flagged"] else ""))
    return t
