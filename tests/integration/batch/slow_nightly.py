"""``python -m tests.integration.batch.slow_nightly AS_OF``: ``fraudscore nightly`` with a slow cache writer.

The real pipeline and adapters (settings from the environment, as the CLI), but the Redis writer
is wrapped to write 200 keys at a time and pause after each chunk: a run slow enough to be killed
part-way through its writes (test_killed_run_leaves_previous_generation_then_rerun_completes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from scoring_service import bootstrap
from scoring_service.adapters.redis.cache_writer import WriteStats
from scoring_service.batch.ports import CacheWriter
from scoring_service.config import load_settings
from scoring_service.core.features import epoch_seconds


class SlowWriter:
    def __init__(self, inner: CacheWriter, chunk: int = 200, pause_s: float = 0.2) -> None:
        self.inner, self.chunk, self.pause_s = inner, chunk, pause_s

    def write_items(self, items: Sequence[tuple[bytes, bytes]], progress: Callable[[int], None] | None = None) -> WriteStats:
        started, keys = time.perf_counter(), 0
        for i in range(0, len(items), self.chunk):
            keys += self.inner.write_items(items[i: i + self.chunk], progress).keys
            time.sleep(self.pause_s)
        return WriteStats(keys, time.perf_counter() - started)

    def switch_generation(self, model_version: str, generation: str, sample: Sequence[bytes]) -> str | None:
        return self.inner.switch_generation(model_version, generation, sample)


def main() -> None:
    settings = load_settings()
    writer = SlowWriter(bootstrap.batch_cache_writer(settings))
    bootstrap.run_nightly(settings, as_of=epoch_seconds(sys.argv[1]), writer=writer, show_progress=False)


if __name__ == "__main__":
    main()
