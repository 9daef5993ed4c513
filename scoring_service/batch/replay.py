"""Replay recorded events: rebuild/backfill the cache for a window, or drive the live service.

``fraudscore replay --from A --to B`` rebuilds the cache as of B from the events in [A, B) with
the nightly pipeline itself (``nightly.run_batch``: same window rules, dead letters, generation
switch, run record; job ``replay``). A and B are times, or ``partition:offset[,partition:offset]``
bounds on the payments topic (partitions not named read from their start / to their end; with an
offset ``--to``, as_of is the newest payment read).

``--through-service ADDRESS --speed X`` instead sends the window's payments as ``Score()`` calls
at X times their original pace (0 = as fast as possible, ``--concurrency`` in flight), joins the
answers with the labels and reports served average precision, Card Precision@100 per day, the
cache hit ratio and latency percentiles (JSON and a table).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scoring_service.batch import events as ev
from scoring_service.batch.pipeline import BatchError, BatchResult, run_batch
from scoring_service.config import Settings
from scoring_service.core.metrics import average_precision, card_precision_at_k, card_precision_per_day
from scoring_service.core.features import LABEL_DELAY_DAYS, epoch_seconds
from scoring_service.logging import get_logger

log = get_logger(__name__)


@dataclass
class Bound:
    time: float | None = None
    offsets: dict[int, int] | None = None


def parse_bound(spec: str | None) -> Bound:
    """A time (ISO 8601 / date / epoch seconds) or ``p:o[,p:o...]``."""
    if spec is None or spec == "":
        return Bound()
    from scoring_service.adapters.kafka.kafka_io import parse_offset_spec

    parts = [s.strip() for s in spec.split(",") if s.strip()]
    parsed = [parse_offset_spec(p) for p in parts]
    if parts and all(p is not None for p in parsed):
        return Bound(offsets={p: o for p, o in parsed})  # type: ignore[misc]
    try:
        return Bound(time=epoch_seconds(spec))
    except (ValueError, TypeError) as exc:
        raise BatchError(f"bad time or partition:offset {spec!r}: {exc}") from None


def _as_of_for_offsets(settings: Settings, offsets: dict[int, int]) -> float:
    """The newest payment timestamp just before the given end offsets (+1 ms)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "fraudscore-replay-probe",
                  "enable.auto.commit": False})
    topic = settings.topic("payments")
    newest = None
    try:
        for p, o in offsets.items():
            if o <= 0:
                continue
            c.assign([TopicPartition(topic, p, o - 1)])
            m = c.poll(10)
            if m is not None and m.error() is None:
                ts = m.timestamp()[1] / 1000.0
                newest = ts if newest is None else max(newest, ts)
    finally:
        c.close()
    if newest is None:
        raise BatchError("the --to offsets point at no message: nothing to replay")
    return newest + 0.001


def replay_cache(settings: Settings, frm: str | None, to: str | None, *, group_id: str | None = None,
                 workers: int = 1, source: str | None = None,
                 redis_url: str | None = None, show_progress: bool | None = None) -> BatchResult:
    """Rebuild the cache as of ``to`` from the events in [``frm``, ``to``) (nightly's pipeline)."""
    a, b = parse_bound(frm), parse_bound(to)
    if b.offsets and not settings.kafka_bootstrap:
        raise BatchError("partition:offset bounds need Kafka (KAFKA_BOOTSTRAP_SERVERS)")
    if a.offsets and not settings.kafka_bootstrap:
        raise BatchError("partition:offset bounds need Kafka (KAFKA_BOOTSTRAP_SERVERS)")
    if b.time is not None:
        as_of = b.time
    elif b.offsets:
        from scoring_service.adapters.kafka import kafka_io

        try:
            kafka_io.check_reachable(settings.kafka_bootstrap or "")
        except kafka_io.KafkaUnavailable as exc:
            raise BatchError(str(exc)) from None
        as_of = _as_of_for_offsets(settings, b.offsets)
    else:
        as_of = time.time()
    start = a.time
    if a.offsets:  # offsets bound the payments; the time window must not cut them off
        start = 0.0
    if start is not None and start >= as_of:
        raise BatchError("--from must be before --to")
    return run_batch(settings, job="replay", as_of=as_of, start=start,
                     group_id=group_id or "fraudscore-replay", workers=workers, source=source,
                     offsets_from=a.offsets, offsets_to=b.offsets, redis_url=redis_url,
                     show_progress=show_progress)


# ------------------------------------------------------------------------------------ metrics



def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def summarise(payments: pd.DataFrame, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Join answers (one per payment, same order) with labels and compute the served metrics."""
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
    return {
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
                 progress: Any = None) -> list[dict[str, Any]]:
    import grpc

    from scoring_service.protos import scoring_pb2, scoring_pb2_grpc

    answers: list[dict[str, Any]] = [{} for _ in range(len(payments))]
    ts = payments["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64")
    rows = list(zip(payments["transaction_id"].tolist(), payments["customer_id"].tolist(),
                    payments["terminal_id"].tolist(), payments["amount"].tolist(), ts.tolist()))
    sem = asyncio.Semaphore(max(1, concurrency))
    Source = scoring_pb2.Source
    Decision = scoring_pb2.Decision
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.FraudScoringStub(channel)

        async def one(i: int, row: tuple) -> None:
            tx, cu, te, am, ns = row
            req = scoring_pb2.ScoreRequest(request_id=f"replay-{tx}", transaction=scoring_pb2.Transaction(
                transaction_id=tx, customer_id=cu, terminal_id=te, amount=am))
            req.transaction.timestamp.FromNanoseconds(int(ns))
            t0 = time.perf_counter()
            try:
                resp = await stub.Score(req, timeout=timeout_s)
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


def replay_through_service(settings: Settings, address: str, frm: str | None, to: str | None, *,
                           speed: float = 0.0, concurrency: int = 32, source: str | None = None,
                           limit: int | None = None, timeout_s: float = 2.0, show_progress: bool | None = None
                           ) -> dict[str, Any]:
    """Send the window's payments to ``address`` as Score() calls; the served metrics."""
    from scoring_service.batch.progress import Progress

    a, b = parse_bound(frm), parse_bound(to)
    if a.offsets or b.offsets:
        raise BatchError("--through-service takes times for --from/--to")
    end = b.time if b.time is not None else time.time()
    start = a.time if a.time is not None else end - 86400.0
    # labels: every label of the window, whenever it arrived (we judge the answers afterwards)
    label_horizon = end + (LABEL_DELAY_DAYS + 1) * 86400.0
    if settings.kafka_bootstrap:
        from scoring_service.adapters.kafka import kafka_io
        from scoring_service.batch.pipeline import consume_kafka

        try:
            kafka_io.check_reachable(settings.kafka_bootstrap)
        except kafka_io.KafkaUnavailable as exc:
            raise BatchError(str(exc)) from None
        pr = kafka_io.resolve_window(settings.kafka_bootstrap, settings.topic("payments"), int(start * 1000), int(end * 1000))
        lr = kafka_io.resolve_window(settings.kafka_bootstrap, settings.topic("labels"), int(start * 1000),
                                     int(label_horizon * 1000))
        c = consume_kafka(settings, pr, lr, group_id="fraudscore-replay-service", workers=1, job="replay",
                          start=start, end=label_horizon, show_progress=False)
        ts = c.payments["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64") / 1e9
        payments = ev.attach_labels(c.payments.loc[(ts >= start) & (ts < end)], c.labels)
    else:
        src = source
        if not src:
            import os

            src = os.environ.get("FRAUDSCORE_EVENTS_FILE")
        if not src:
            raise BatchError("no event source: set KAFKA_BOOTSTRAP_SERVERS or pass --source FILE")
        frame = ev.FileEventSource(src).frame()
        payments = ev.window_from_frame(frame, start, end, LABEL_DELAY_DAYS).payments
        # every label of the window (they arrive after the payments; the report comes later)
        if "is_fraud" in frame.columns:
            lab = frame.drop_duplicates("transaction_id").set_index("transaction_id")["is_fraud"]
            payments["is_fraud"] = payments["transaction_id"].map(lab).fillna(-1).astype(np.int8).to_numpy()
    if limit:
        payments = payments.head(limit)
    started = time.perf_counter()
    with Progress("replay", enabled=show_progress) as prog, prog.phase("score", len(payments)) as adv:
        answers = asyncio.run(_drive(address, payments, speed, concurrency, timeout_s, adv))
    wall = time.perf_counter() - started
    report = summarise(payments, answers)
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
    return t
