"""The confluent-kafka adapter: topics, a batching producer, windowed readers, publishing a frame.

* Topics are created with ``retention.ms=-1``: events keep their real (possibly years-old)
  timestamps and the default 7-day retention would delete them.
* Payments and labels are keyed by customer id, so a customer's events live in one partition,
  and the two topics have the same partition count so partition *p* of both holds the same
  customers.
* A window is resolved to offsets per partition with ``offsets_for_times``: [first offset with
  timestamp >= start, first offset with timestamp >= end). Readers stop at the end offset, never
  at "no message for a while", so a run reads exactly its window whatever arrives meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from scoring_service.adapters.kafka.codec import Outgoing, RawMessage, label_messages, payment_messages
from scoring_service.core.events import EventSourceError
from scoring_service.core.features import LABEL_DELAY_DAYS
from scoring_service.logging import get_logger

log = get_logger(__name__)

DEFAULT_PARTITIONS = 4


class KafkaUnavailable(EventSourceError):
    """The brokers cannot be reached (or do not answer) within the timeout."""


class TopicMissing(EventSourceError):
    """The brokers answer, but a topic to read does not exist: nothing published yet, or another prefix.
    Not :class:`KafkaUnavailable`: waiting for the brokers, or restarting them, fixes nothing."""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    topic: str
    partition: int
    start: int  # first offset to read
    end: int  # first offset NOT to read

    @property
    def count(self) -> int:
        return max(0, self.end - self.start)


def _common(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 5000,
            "reconnect.backoff.max.ms": 2000}


def admin(bootstrap: str) -> AdminClient:
    return AdminClient(_common(bootstrap))


def check_reachable(bootstrap: str, timeout: float = 5.0, *, topics: Iterable[str] = ()) -> None:
    """Raise :class:`KafkaUnavailable` with a clear message when no broker answers, and
    :class:`TopicMissing` naming those of ``topics`` that do not exist (from the same metadata)."""
    if not bootstrap:
        raise KafkaUnavailable("no Kafka bootstrap servers configured")
    try:
        md = admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} is unreachable: {exc.args[0].str() if exc.args else exc}") from None
    if not md.brokers:
        raise KafkaUnavailable(f"Kafka at {bootstrap} answered with no brokers")
    missing = [t for t in topics if t not in md.topics]
    if missing:
        raise TopicMissing(f"Kafka topic{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                           f"{'do' if len(missing) > 1 else 'does'} not exist on {bootstrap}: nothing published "
                           "there yet (`fraudscore events publish`), or FRAUDSCORE_KAFKA_TOPIC_PREFIX names other topics")


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = DEFAULT_PARTITIONS,
                  timeout: float = 30.0) -> None:
    """Create missing topics (retention.ms=-1); existing ones are left as they are."""
    a = admin(bootstrap)
    existing = set(a.list_topics(timeout=timeout).topics)
    new = [NewTopic(t, num_partitions=partitions, replication_factor=1,
                    config={"retention.ms": "-1", "retention.bytes": "-1"})
           for t in topics if t not in existing]
    if not new:
        return
    for _topic, fut in a.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    # metadata propagates asynchronously: wait until every new topic has its partitions
    deadline = time.monotonic() + timeout
    names = {t.topic for t in new}
    while time.monotonic() < deadline:
        md = a.list_topics(timeout=timeout).topics
        if all(n in md and len(md[n].partitions) == partitions for n in names):
            return
        time.sleep(0.1)


def partitions_of(bootstrap: str, topic: str, timeout: float = 10.0) -> list[int]:
    md = admin(bootstrap).list_topics(topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return []
    return sorted(t.partitions)


# ---------------------------------------------------------------------------------------- produce
class EventProducer:
    """A batching producer (linger, large batches, lz4); raises on the first delivery failure."""

    def __init__(self, bootstrap: str, *, linger_ms: int = 50, batch_bytes: int = 1_000_000,
                 extra: dict[str, Any] | None = None) -> None:
        conf = {
            **_common(bootstrap),
            "linger.ms": linger_ms,
            "batch.size": batch_bytes,
            "batch.num.messages": 100_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "enable.idempotence": False,
            "acks": "all",
            "message.timeout.ms": 60_000,
        }
        conf.update(extra or {})
        self._p = Producer(conf)
        self.delivered = 0
        self.errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            if len(self.errors) < 20:
                self.errors.append(err.str())
        else:
            self.delivered += 1

    def produce(self, topic: str, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None,
                partition: int | None = None) -> None:
        kwargs: dict[str, Any] = {"on_delivery": self._on_delivery}
        if timestamp_ms is not None:
            kwargs["timestamp"] = int(timestamp_ms)
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._p.produce(topic, value, key, **kwargs)
                break
            except BufferError:
                self._p.poll(0.05)
        if self.errors:
            raise KafkaException(f"delivery to {topic} failed: {self.errors[0]}")

    def produce_many(self, topic: str, messages: Iterable[Outgoing], progress: Callable[[int], None] | None = None,
                     every: int = 10_000) -> int:
        """Produce every message (key, value, timestamp); returns how many."""
        n = 0
        for m in messages:
            self.produce(topic, m.value, m.key, m.timestamp_ms)
            n += 1
            if n % every == 0:
                self._p.poll(0)
                if progress:
                    progress(every)
        if progress and n % every:
            progress(n % every)
        return n

    def flush(self, timeout: float = 120.0) -> None:
        remaining = self._p.flush(timeout)
        if self.errors:
            raise KafkaException(f"delivery failed: {self.errors[0]}")
        if remaining:
            raise KafkaUnavailable(f"{remaining} messages not delivered within {timeout}s")


# ---------------------------------------------------------------------------------------- consume
def _consumer(bootstrap: str, group_id: str, **extra: Any) -> Consumer:
    return Consumer({
        **_common(bootstrap),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "fetch.max.bytes": 52_428_800,
        "max.partition.fetch.bytes": 10_485_760,
        "queued.max.messages.kbytes": 262_144,
        **extra,
    })


def resolve_window(bootstrap: str, topic: str, start_ms: int | None, end_ms: int | None,
                   *, partitions: list[int] | None = None, timeout: float = 15.0) -> list[PartitionRange]:
    """Offsets per partition for message timestamps in [start_ms, end_ms) (None = open end)."""
    parts = partitions if partitions is not None else partitions_of(bootstrap, topic, timeout)
    if not parts:
        raise TopicMissing(f"Kafka topic {topic!r} does not exist on {bootstrap}")
    c = _consumer(bootstrap, "fraudscore-window-resolver")
    try:
        lows_highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in parts}

        def at(ts_ms: int | None, default_high: bool) -> dict[int, int]:
            if ts_ms is None:
                return {p: (lows_highs[p][1] if default_high else lows_highs[p][0]) for p in parts}
            found = c.offsets_for_times([TopicPartition(topic, p, int(ts_ms)) for p in parts], timeout=timeout)
            out: dict[int, int] = {}
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                # -1: no message at or after ts -> the end of the partition
                out[tp.partition] = tp.offset if tp.offset >= 0 else lows_highs[tp.partition][1]
            return out

        starts, ends = at(start_ms, False), at(end_ms, True)
    finally:
        c.close()
    return [PartitionRange(topic, p, starts[p], max(starts[p], ends[p])) for p in parts]


def read_ranges(bootstrap: str, ranges: list[PartitionRange], group_id: str, *, commit: bool = True,
                progress: Callable[[int], None] | None = None, batch: int = 10_000,
                timeout: float = 30.0) -> Iterator[RawMessage]:
    """Every message in ``ranges`` as (topic, partition, offset, key, value); stops at the ends.

    Partitions are assigned explicitly (the run's plan decides who reads what); the consumer is
    in ``group_id`` and commits the end offsets it reached, so the group shows the run's progress.
    A partition that yields nothing for ``timeout`` seconds while short of its end offset is an
    error (the data was deleted or the broker is gone): never a silent partial window.
    """
    todo = {(r.topic, r.partition): r for r in ranges if r.count > 0}
    if not todo:
        return
    c = _consumer(bootstrap, group_id)
    try:
        c.assign([TopicPartition(r.topic, r.partition, r.start) for r in todo.values()])
        last_progress = time.monotonic()
        while todo:
            msgs = c.consume(batch, timeout=1.0)
            if not msgs:
                if time.monotonic() - last_progress > timeout:
                    missing = ", ".join(f"{t}[{p}] at <{r.end}" for (t, p), r in todo.items())
                    raise KafkaUnavailable(f"no messages for {timeout}s while reading {missing}")
                continue
            last_progress = time.monotonic()
            n = 0
            done: list[tuple[str, int]] = []
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                k = (str(m.topic()), int(m.partition() or 0))
                r = todo.get(k)
                if r is None:
                    continue
                off = int(m.offset() or 0)
                if off >= r.end:
                    done.append(k)
                    continue
                n += 1
                yield k[0], k[1], off, m.key(), m.value()
                if off >= r.end - 1:
                    done.append(k)
            if progress and n:
                progress(n)
            for k in done:
                if k in todo:
                    r = todo.pop(k)
                    c.pause([TopicPartition(r.topic, r.partition)])
                    if commit:
                        c.commit(offsets=[TopicPartition(r.topic, r.partition, r.end)], asynchronous=False)
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
    c = _consumer(bootstrap, "fraudscore-watermarks")
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                for p in partitions_of(bootstrap, topic, timeout)}
    finally:
        c.close()


def newest_timestamp_before(bootstrap: str, topic: str, offsets: Mapping[int, int], timeout: float = 10.0) -> float | None:
    """The newest message timestamp (epoch seconds) just before the given end offsets; None if none."""
    c = _consumer(bootstrap, "fraudscore-replay-probe")
    newest: float | None = None
    try:
        for p, o in offsets.items():
            if o <= 0:
                continue
            c.assign([TopicPartition(topic, p, o - 1)])
            m = c.poll(timeout)
            if m is not None and m.error() is None:
                ts = m.timestamp()[1] / 1000.0
                newest = ts if newest is None else max(newest, ts)
    finally:
        c.close()
    return newest


__all__ = [
    "OFFSET_END", "EventProducer", "KafkaUnavailable", "PartitionRange", "TopicMissing",
    "check_reachable", "ensure_topics", "end_offsets", "newest_timestamp_before", "partitions_of",
    "publish_frame", "read_ranges", "resolve_window",
]


# ---------------------------------------------------------------------------------------- publishing
@dataclass
class PublishStats:
    payments: int
    labels: int
    labels_skipped_future: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return (self.payments + self.labels) / self.seconds if self.seconds > 0 else float("inf")


def publish_frame(bootstrap: str, payments_topic: str, labels_topic: str, payments: pd.DataFrame, *,
                  label_delay_days: float = LABEL_DELAY_DAYS, partitions: int = DEFAULT_PARTITIONS,
                  progress: Callable[[int], None] | None = None) -> PublishStats:
    """Publish a normalised payments frame: payments stamped with their own time, then labels
    stamped payment time + delay (those that would be in the future are skipped and counted)."""
    check_reachable(bootstrap)
    ensure_topics(bootstrap, [payments_topic, labels_topic], partitions=partitions)
    started = time.perf_counter()
    prod = EventProducer(bootstrap)
    n_pay = prod.produce_many(payments_topic, payment_messages(payments), progress)
    plan = label_messages(payments, label_delay_days)
    n_lab = prod.produce_many(labels_topic, plan.messages, progress)
    prod.flush()
    return PublishStats(n_pay, n_lab, plan.skipped_future, time.perf_counter() - started)
