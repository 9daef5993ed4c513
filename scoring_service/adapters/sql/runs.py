"""The record of batch runs: one ``batch_runs`` row per run, ``batch_offsets`` rows per topic partition read."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from scoring_service.adapters.sql.db import BatchOffset, BatchRun


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


class RunRecorder:
    """Creates and updates ``batch_runs`` rows on an (already migrated) database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, job: str, model_version: str, start: float, end: float) -> int:
        """A new ``running`` row for the window [start, end) (epoch seconds); its id."""
        with Session(self.engine) as s, s.begin():
            row = BatchRun(job=job, status="running", model_version=model_version, generation="",
                           window_start=_utc(start), window_end=_utc(end), details={})
            s.add(row)
            s.flush()
            return row.id

    def update(self, run_id: int, *, offsets: Iterable[tuple[str, int, int, int]] = (), **fields: Any) -> None:
        """Set columns of the run's row (``status``, counts, ``details``, ...) and add its offsets
        ((topic, partition, start offset, end offset) rows)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(BatchRun, run_id)
            if row is None:
                raise LookupError(f"no batch run {run_id}")
            for k, v in fields.items():
                setattr(row, k, v)
            for topic, part, start, end in offsets:
                s.add(BatchOffset(run_id=run_id, topic=topic, partition=part, start_offset=start, end_offset=end))
