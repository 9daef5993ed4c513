"""The Kafka event source of the batch jobs: one window of ``<prefix>.payments`` and ``<prefix>.labels``.

:meth:`KafkaEventSource.read_window` for [start, end):

1. **resolve** the window to offsets per partition with ``offsets_for_times`` ([first offset at
   or after start, first offset at or after end)); labels up to ``labels_until`` (default end).
   Replay's ``partition:offset`` bounds (:meth:`~KafkaEventSource.with_offsets`) override the
   payments' ranges.
2. **read** exactly those offsets (stop at the end offsets, never at "quiet for a while"); decode
   and validate; bad events go to ``<prefix>.dead-letter`` with the reason and are counted - a run
   never stops for them.
3. **join**: payments with a payment time in the window (the offsets come from message
   timestamps), labels that had arrived before the end (``scoring_service.core.events``).

Scale-out (``workers`` > 1): N consumer processes in one consumer group split the *partitions*
(worker i reads the i-th share of the sorted partitions of both topics; payments and labels are
keyed by customer, so a customer's events and labels are in the same partition number) and do the
per-event work: fetch, decode, validate, dead-letter, commit the group's offsets. Terminals span
partitions, and a payment's terminal features need every partition's payments of that terminal,
so the workers' decoded frames are merged here and the caller computes features, scores and
entities once. The per-event part is what grows with traffic; the merged frame of a nightly
window is a few hundred MB at most for millions of events.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import pandas as pd

from scoring_service.adapters.kafka import codec, kafka_io
from scoring_service.adapters.kafka.kafka_io import EventProducer, PartitionRange
from scoring_service.core.events import EventSourceError, Rejected, WindowEvents, attach_labels, count_reasons, in_window
from scoring_service.logging import LogRelay

Progress = Callable[[int], None]


class DeadLetterProducer:
    """Sends rejected messages to ``<prefix>.dead-letter`` (key = original key)."""

    def __init__(self, bootstrap: str, topic: str, job: str) -> None:
        self._p = EventProducer(bootstrap, linger_ms=20)
        self.topic = topic
        self.job = job
        self.sent = 0

    def send(self, rejected: list[Rejected]) -> int:
        now = time.time()
        for r in rejected:
            self._p.produce(self.topic, codec.dead_letter_value(r, self.job, now), r.key)
        self.sent += len(rejected)
        return len(rejected)

    def flush(self) -> None:
        self._p.flush(60)


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


# ------------------------------------------------------------------------------------ one worker's share
@dataclass(frozen=True)
class _Share:
    bootstrap: str
    payments: list[PartitionRange]
    labels: list[PartitionRange]
    group_id: str
    dead_letter_topic: str
    job: str
    start: float
    end: float
    labels_until: float
    worker: int


@dataclass
class _ShareResult:
    payments: pd.DataFrame
    labels: pd.DataFrame
    events: int
    dead_letters: int
    reasons: dict[str, int]
    summary: dict[str, Any] = field(default_factory=dict)


def _read_share(share: _Share, progress: Progress | None) -> _ShareResult:
    """Read, decode, validate, dead-letter one share (in a child process, or inline)."""
    started = time.perf_counter()
    decoded = codec.decode_payments(kafka_io.read_ranges(share.bootstrap, share.payments, share.group_id, progress=progress))
    labels, lab_rejected = codec.decode_labels(kafka_io.read_ranges(share.bootstrap, share.labels, share.group_id,
                                                                    progress=progress))
    payments = in_window(decoded.frame, share.start, share.end)
    labels = labels.loc[labels["labelled_at_s"] < share.labels_until]
    rejected = decoded.rejected + lab_rejected
    if rejected:
        dlp = DeadLetterProducer(share.bootstrap, share.dead_letter_topic, share.job)
        dlp.send(rejected)
        dlp.flush()
    events = sum(r.count for r in share.payments + share.labels)
    summary = {"worker": share.worker, "partitions": sorted({r.partition for r in share.payments}), "events": events,
               "dead_letters": len(rejected), "seconds": round(time.perf_counter() - started, 3)}
    return _ShareResult(payments, labels, events, len(rejected), count_reasons(rejected), summary)


def _child(share: _Share, conn: Connection) -> None:
    try:
        conn.send(("ok", _read_share(share, None)))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _read_in_processes(shares: list[_Share]) -> list[_ShareResult]:
    ctx = multiprocessing.get_context("fork")
    relay = LogRelay()  # their log lines reach our stderr whole (docs/observability.md)
    procs = []
    for share in shares:
        parent, child = ctx.Pipe(duplex=False)
        p = relay.process(ctx, _child, (share, child), daemon=True)
        child.close()
        procs.append((p, parent))
    results: list[_ShareResult] = []
    errors: list[str] = []
    for p, parent in procs:
        try:
            status, payload = parent.recv()
        except EOFError:
            status, payload = "error", f"worker exited with {p.exitcode}"
        p.join()
        if status == "ok":
            results.append(payload)
        else:
            errors.append(payload)
    relay.join()
    if errors:
        raise EventSourceError(f"consumer worker failed: {errors[0]}")
    return results


# ------------------------------------------------------------------------------------ the source
@dataclass(frozen=True)
class KafkaEventSource:
    """Payments and labels of a window from Kafka; rejects to the dead-letter topic."""

    bootstrap: str
    payments_topic: str
    labels_topic: str
    dead_letter_topic: str
    job: str
    group_id: str
    workers: int = 1
    offsets_from: Mapping[int, int] | None = None  # partition -> first payments offset to read
    offsets_to: Mapping[int, int] | None = None  # partition -> first payments offset not to read

    @property
    def name(self) -> str:
        return "kafka"

    def check(self) -> None:
        """Raise :class:`~kafka_io.KafkaUnavailable` when no broker answers, :class:`~kafka_io.TopicMissing`
        when the payments or labels topic does not exist (before a run records anything)."""
        kafka_io.check_reachable(self.bootstrap, topics=(self.payments_topic, self.labels_topic))

    def with_offsets(self, offsets_from: Mapping[int, int] | None, offsets_to: Mapping[int, int] | None) -> KafkaEventSource:
        """The same source with the payments bounded by offsets (partitions not named: the time window)."""
        return dataclasses.replace(self, offsets_from=offsets_from, offsets_to=offsets_to)

    def newest_payment_time(self, offsets: Mapping[int, int]) -> float | None:
        """The newest payment's message time just before the given end offsets (None: no message there)."""
        self.check()
        return kafka_io.newest_timestamp_before(self.bootstrap, self.payments_topic, offsets)

    def _ranges(self, start: float, end: float, labels_until: float) -> tuple[list[PartitionRange], list[PartitionRange]]:
        pay = kafka_io.resolve_window(self.bootstrap, self.payments_topic, int(start * 1000), int(end * 1000))
        lab = kafka_io.resolve_window(self.bootstrap, self.labels_topic, int(start * 1000), int(labels_until * 1000))
        if self.offsets_from or self.offsets_to:
            lo, hi = self.offsets_from or {}, self.offsets_to or {}
            pay = [PartitionRange(r.topic, r.partition, lo.get(r.partition, r.start), hi.get(r.partition, r.end))
                   for r in pay]
        return pay, lab

    def read_window(self, start: float, end: float, *, labels_until: float | None = None,
                    progress: Progress | None = None) -> WindowEvents:
        until = end if labels_until is None else labels_until
        pay, lab = self._ranges(start, end, until)
        kafka_io.ensure_topics(self.bootstrap, [self.dead_letter_topic], partitions=max(1, len(pay)))
        shares = [_Share(self.bootstrap, [r for r in pay if r.partition in parts], [r for r in lab if r.partition in parts],
                         self.group_id, self.dead_letter_topic, self.job, start, end, until, w)
                  for w, parts in enumerate(split_partitions([r.partition for r in pay], self.workers))]
        results = [_read_share(shares[0], progress)] if len(shares) == 1 else _read_in_processes(shares)
        labels = pd.concat([r.labels for r in results], ignore_index=True)
        reasons: dict[str, int] = {}
        for r in results:
            for k, v in r.reasons.items():
                reasons[k] = reasons.get(k, 0) + v
        return WindowEvents(
            payments=attach_labels(pd.concat([r.payments for r in results], ignore_index=True), labels),
            events_consumed=sum(r.events for r in results),
            dead_letters=sum(r.dead_letters for r in results),
            dead_letter_reasons=reasons,
            offsets=[(r.topic, r.partition, r.start, r.end) for r in pay + lab],
            details={"workers": [r.summary for r in results], "labels": len(labels)},
        )
