"""The event source of the batch jobs when no Kafka is configured: a Parquet file, or a frame in memory.

It gives what a Kafka consumer would for the same window (``scoring_service.core.events``):
payments in the window, validated (invalid rows are counted as dead letters and kept in
``WindowEvents.rejected``; a file has no dead-letter topic), and labels only where they had
arrived (payment time + ``label_delay_days``) by the end of the window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from scoring_service.adapters.files.payments_file import PaymentsFileError, read_payments_file
from scoring_service.core.events import EventError, WindowEvents, window_from_frame
from scoring_service.core.features import LABEL_DELAY_DAYS


class FileEventSource:
    """Payments (and their labels) from a Parquet file (handbook columns or the normalised frame),
    or from a normalised payments frame already in memory (``frame=``: ``rebuild_cache``, benchmarks)."""

    def __init__(self, path: str | Path | None = None, *, frame: pd.DataFrame | None = None,
                 label_delay_days: float = LABEL_DELAY_DAYS) -> None:
        if (path is None) == (frame is None):
            raise ValueError("FileEventSource takes a path or a frame")
        self.path = Path(path) if path is not None else None
        self.name = str(path) if path is not None else "frame"
        self.label_delay_days = label_delay_days
        self._frame = frame

    def check(self) -> None:
        """Raise :class:`EventError` when the file is not there (before a run records anything)."""
        if self._frame is None and self.path is not None and not self.path.exists():
            raise EventError(f"event file {self.path} does not exist")

    def frame(self) -> pd.DataFrame:
        """Every payment of the file (read once), labels included."""
        if self._frame is None:
            self.check()
            assert self.path is not None
            try:
                self._frame = read_payments_file(self.path)
            except PaymentsFileError as exc:
                raise EventError(str(exc)) from None
        return self._frame

    def read_window(self, start: float, end: float, *, labels_until: float | None = None,
                    progress: Callable[[int], None] | None = None) -> WindowEvents:
        events = window_from_frame(self.frame(), start, end, self.label_delay_days, labels_until=labels_until)
        events.details["source"] = self.name
        if progress is not None:
            progress(events.events_consumed)
        return events
