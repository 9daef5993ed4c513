"""The batch pipeline's steps on fakes of the event source, the cache writer and the run log (no servers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest

from scoring_service.adapters.files.event_source import FileEventSource
from scoring_service.adapters.redis.cache_writer import CacheWriteError, WriteStats
from scoring_service.batch import replay
from scoring_service.batch.pipeline import BatchAdapters, BatchError, run_batch
from scoring_service.batch.ports import ActiveModel
from scoring_service.batch.sources import EventSource, OffsetBoundedSource
from scoring_service.core import features
from scoring_service.core.cache_layout import CacheEntry, entity_key
from scoring_service.core.events import EventSourceError, WindowEvents, nightly_window, window_from_frame

AS_OF = pd.Timestamp("2018-08-15").value / 1e9
DAY = 86400.0


def _payments(n: int = 60) -> pd.DataFrame:
    """Payments of 6 customers at 4 terminals over the 20 days before AS_OF, every label known."""
    ts = pd.Timestamp("2018-08-15") - pd.to_timedelta(np.linspace(20, 0.1, n), unit="D")
    return pd.DataFrame({
        "transaction_id": [f"tx{i}" for i in range(n)],
        "customer_id": [f"c{i % 6}" for i in range(n)],
        "terminal_id": [f"t{i % 4}" for i in range(n)],
        "amount": np.linspace(1.0, 200.0, n),
        "timestamp": ts.astype("datetime64[ns]"),
        "is_fraud": np.array([1 if i % 17 == 0 else 0 for i in range(n)], dtype=np.int8),
    })


class FakeSource:
    """Reads from a frame with the real window rules; remembers the windows asked for."""

    name = "fake"

    def __init__(self, payments: pd.DataFrame, *, dead_letters: dict[str, int] | None = None,
                 unreachable: bool = False) -> None:
        self.payments, self.unreachable, self.reasons = payments, unreachable, dead_letters or {}
        self.windows: list[tuple[float, float, float | None]] = []

    def check(self) -> None:
        if self.unreachable:
            raise EventSourceError("Kafka at nowhere:9092 is unreachable")

    def read_window(self, start: float, end: float, *, labels_until: float | None = None,
                    progress: Callable[[int], None] | None = None) -> WindowEvents:
        self.windows.append((start, end, labels_until))
        events = window_from_frame(self.payments, start, end, labels_until=labels_until, now=AS_OF)
        events.dead_letters = sum(self.reasons.values())
        events.dead_letter_reasons = dict(self.reasons)
        events.events_consumed += events.dead_letters
        events.offsets = [("fs.payments", 0, 0, events.events_consumed)]
        return events


class FakeOffsetSource(FakeSource):
    def __init__(self, payments: pd.DataFrame) -> None:
        super().__init__(payments)
        self.bounds: tuple[Mapping[int, int] | None, Mapping[int, int] | None] | None = None

    def with_offsets(self, offsets_from: Mapping[int, int] | None,
                     offsets_to: Mapping[int, int] | None) -> FakeOffsetSource:
        self.bounds = (offsets_from, offsets_to)
        return self

    def newest_payment_time(self, offsets: Mapping[int, int]) -> float | None:
        return AS_OF - 3600.0


class FakeWriter:
    """A cache in a dict; ``fail_at``: the write call that raises (a Redis that refuses part-way)."""

    def __init__(self, *, fail_at: int | None = None, active: str | None = None) -> None:
        self.store: dict[bytes, bytes] = {}
        self.active: dict[str, str | None] = {}
        self.previous = active
        self.calls: list[str] = []
        self.fail_at = fail_at

    def write_items(self, items: Sequence[tuple[bytes, bytes]], progress: Callable[[int], None] | None = None) -> WriteStats:
        for i in range(0, len(items), 4):  # in chunks, as Redis is written
            self.calls.append("write")
            if self.fail_at is not None and len(self.calls) >= self.fail_at:
                raise CacheWriteError("Redis refused a bulk write: OOM command not allowed")
            self.store.update(items[i: i + 4])
            if progress:
                progress(len(items[i: i + 4]))
        return WriteStats(len(items), 0.01)

    def switch_generation(self, model_version: str, generation: str, sample: Sequence[bytes]) -> str | None:
        assert all(k in self.store for k in sample)
        self.calls.append("switch")
        previous = self.active.get(model_version, self.previous)
        self.active[model_version] = generation
        return previous


class FakeRuns:
    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.offsets: dict[int, list[tuple[str, int, int, int]]] = {}

    def start(self, job: str, model_version: str, start: float, end: float) -> int:
        run_id = len(self.rows) + 1
        self.rows[run_id] = {"job": job, "status": "running", "model_version": model_version, "window": (start, end)}
        return run_id

    def update(self, run_id: int, *, offsets: Sequence[tuple[str, int, int, int]] = (), **fields: Any) -> None:
        self.rows[run_id].update(fields)
        self.offsets.setdefault(run_id, []).extend(offsets)


class FakeModel:
    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.clip(X[:, 0] / 1000.0, 0, 1)

    def explain(self, X: np.ndarray, top_k: int = 3) -> list[list[tuple[str, str, float]]]:
        return [[("AMOUNT", "amount", 0.5)] for _ in range(len(X))]


MODEL = ActiveModel("m1", FakeModel())


def _adapters(source: EventSource, writer: FakeWriter | None = None, runs: FakeRuns | None = None) -> BatchAdapters:
    return BatchAdapters(source=source, writer=writer or FakeWriter(), runs=runs or FakeRuns(), model=MODEL)


def test_the_window_comes_from_the_feature_constants():
    source = FakeSource(_payments())
    result = run_batch(_adapters(source), as_of=AS_OF, show_progress=False)
    start, end, _ = source.windows[0]
    assert end == AS_OF == result.window_end
    assert (end - start) / DAY == features.FEATURE_WINDOW_DAYS + features.LABEL_DELAY_DAYS
    assert nightly_window(AS_OF, start=AS_OF - DAY).start == AS_OF - DAY
    run_batch(_adapters(source), as_of=AS_OF, start=AS_OF - 2 * DAY, show_progress=False)
    assert source.windows[1][:2] == (AS_OF - 2 * DAY, AS_OF)


def test_a_run_writes_every_entry_then_switches_the_generation():
    writer, runs = FakeWriter(active="old-gen"), FakeRuns()
    result = run_batch(_adapters(FakeSource(_payments()), writer, runs), as_of=AS_OF, show_progress=False)
    assert writer.calls[-1] == "switch" and writer.calls.count("switch") == 1 and writer.calls.count("write") == 3
    assert writer.active["m1"] == result.generation and result.previous_generation == "old-gen"
    assert result.status == "succeeded" and result.keys_written == len(writer.store) == 6 + 4 == result.entities_scored
    entry = CacheEntry.decode(writer.store[entity_key("m1", result.generation, "c", "c0").encode()])
    assert entry.computed_at == AS_OF and entry.generation == result.generation and entry.reasons
    row = runs.rows[result.run_id]
    assert row["status"] == "succeeded" and row["generation"] == result.generation and row["keys_written"] == 10
    assert runs.offsets[result.run_id] == [("fs.payments", 0, 0, 60)]
    assert set(result.phases) >= {"consume", "features", "score", "explain", "write", "switch", "total"}
    assert result.details["payments"] == 60


def test_a_failing_write_keeps_the_previous_generation_and_records_the_failure():
    writer, runs = FakeWriter(fail_at=2, active="old-gen"), FakeRuns()
    with pytest.raises(BatchError, match="cache write failed, generation not switched: .*OOM"):
        run_batch(_adapters(FakeSource(_payments()), writer, runs), as_of=AS_OF, show_progress=False)
    assert len(writer.store) == 4  # part of the new generation was written ...
    assert "switch" not in writer.calls and writer.active == {}  # ... and never made active
    (row,) = runs.rows.values()
    assert row["status"] == "failed" and "OOM" in row["error"] and row["events_consumed"] == 60
    assert row["generation"] and row["details"]["phases"]["consume"] >= 0 and "write" not in row["details"]["phases"]
    assert runs.offsets[1] == []  # offsets are recorded with a successful run only


def test_dead_letters_are_counted_and_recorded():
    runs = FakeRuns()
    source = FakeSource(_payments(), dead_letters={"amount": 2, "customer_id": 1})
    result = run_batch(_adapters(source, runs=runs), as_of=AS_OF, show_progress=False)
    assert result.status == "succeeded" and result.dead_letters == 3 and result.events_consumed == 63
    row = runs.rows[result.run_id]
    assert row["dead_letters"] == 3 and row["details"]["dead_letter_reasons"] == {"amount": 2, "customer_id": 1}


def test_invalid_rows_of_a_frame_are_dead_letters_not_failures():
    frame = _payments()
    frame.loc[3, "amount"] = -5.0
    frame.loc[7, "customer_id"] = ""
    result = run_batch(_adapters(FileEventSource(frame=frame)), as_of=AS_OF, show_progress=False)
    assert result.dead_letters == 2 and result.details["dead_letter_reasons"] == {"amount": 1, "customer_id": 1}
    assert result.details["source"] == "frame" and result.details["payments"] == 58


def test_an_unreachable_source_fails_before_anything_is_recorded_or_written():
    writer, runs = FakeWriter(), FakeRuns()
    with pytest.raises(BatchError, match="unreachable"):
        run_batch(_adapters(FakeSource(_payments(), unreachable=True), writer, runs), as_of=AS_OF)
    assert runs.rows == {} and writer.calls == []


def test_a_window_without_payments_fails_records_the_run_and_writes_or_switches_nothing():
    """An ``--as-of`` past the events, or producers that stopped: a clear failure (the cache ages
    towards its TTL, and a green run would hide it), never an empty generation made active."""
    writer, runs = FakeWriter(active="old-gen"), FakeRuns()
    with pytest.raises(BatchError, match=r"no payments in the window 2019-\S+ to 2019-\S+ from fake \(0 events read\); "
                                         r"nothing switched, the previous cache generation keeps serving"):
        run_batch(_adapters(FakeSource(_payments()), writer, runs), as_of=AS_OF + 400 * DAY, show_progress=False)
    assert writer.calls == [] and writer.active == {}
    (row,) = runs.rows.values()
    assert row["status"] == "failed" and row["error"].startswith("no payments in the window")

    only_dead = FakeSource(_payments(), dead_letters={"amount": 3})  # every event of the window rejected
    with pytest.raises(BatchError, match=r"\(3 events read, 3 dead letters\)"):
        run_batch(_adapters(only_dead, writer, runs), as_of=AS_OF + 400 * DAY, show_progress=False)
    assert writer.calls == []


def test_the_score_phase_logs_how_many_entities_it_scored(capfd):
    result = run_batch(_adapters(FakeSource(_payments())), as_of=AS_OF, show_progress=False)
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    [score] = [e for e in logged if e.get("event") == "batch.phase_done" and e["phase"] == "score"]
    assert score["items"] == result.entities_scored == 10


def test_replay_offsets_need_a_source_with_offsets():
    assert isinstance(FakeOffsetSource(_payments()), OffsetBoundedSource)
    assert not isinstance(FakeSource(_payments()), OffsetBoundedSource)
    assert not isinstance(FileEventSource(frame=_payments()), OffsetBoundedSource)
    with pytest.raises(BatchError, match="partition:offset bounds need Kafka"):
        replay.replay_cache(_adapters(FakeSource(_payments())), None, "0:10", show_progress=False)
    source = FakeOffsetSource(_payments())
    result = replay.replay_cache(_adapters(source), "0:5", "0:10,1:20", show_progress=False)
    assert source.bounds == ({0: 5}, {0: 10, 1: 20})
    assert result.job == "replay" and result.window_end == AS_OF - 3600.0 + 0.001 and result.window_start == 0.0


def test_replay_by_time():
    source = FakeSource(_payments())
    result = replay.replay_cache(_adapters(source), "2018-08-10", "2018-08-15", show_progress=False)
    assert (result.window_start, result.window_end) == (AS_OF - 5 * DAY, AS_OF)
    with pytest.raises(BatchError, match="--from must be before --to"):
        replay.replay_cache(_adapters(source), "2018-08-15", "2018-08-10")
