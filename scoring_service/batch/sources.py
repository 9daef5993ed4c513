"""What the batch jobs need from an event source, whatever it reads (Kafka, a Parquet file, a frame).

Implementations: ``scoring_service.adapters.kafka.source.KafkaEventSource`` and
``scoring_service.adapters.files.event_source.FileEventSource`` (a file, or a frame in memory);
``scoring_service.bootstrap`` picks one from the settings. Both give the same
:class:`~scoring_service.core.events.WindowEvents` for the same events (the window rules are
``scoring_service.core.events``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from scoring_service.core.events import WindowEvents

ProgressFn = Callable[[int], None]


@runtime_checkable
class EventSource(Protocol):
    @property
    def name(self) -> str:
        """What the run record and the logs call the source ("kafka", a file path, "frame")."""
        ...

    def check(self) -> None:
        """Fail fast when the source cannot be read (before a run records or writes anything).

        Raises ``EventSourceError`` (unreachable) or ``EventError`` (no such file)."""
        ...

    def read_window(self, start: float, end: float, *, labels_until: float | None = None,
                    progress: ProgressFn | None = None) -> WindowEvents:
        """The payments with a payment time in [start, end), validated (rejects counted and, where
        the source has a dead-letter topic, sent there), labelled where the label had arrived before
        ``labels_until`` (default ``end``); ``progress(n)`` as events are read."""
        ...


@runtime_checkable
class OffsetBoundedSource(EventSource, Protocol):
    """A source whose payments can be bounded by ``partition:offset`` (replay's bounds): Kafka."""

    def with_offsets(self, offsets_from: Mapping[int, int] | None,
                     offsets_to: Mapping[int, int] | None) -> OffsetBoundedSource:
        """The same source, the payments read from/to these offsets per partition."""
        ...

    def newest_payment_time(self, offsets: Mapping[int, int]) -> float | None:
        """The time of the newest payment just before these end offsets (None: no message there)."""
        ...
