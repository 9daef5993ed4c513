"""What the batch use case needs besides events: a cache writer, a run log, the active model.

``scoring_service.bootstrap`` builds the real ones (Redis, SQL, the registry's model); the unit
tests pass fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from scoring_service.adapters.redis.cache_writer import WriteStats

__all__ = ["ActiveModel", "CacheWriter", "RunLog", "WriteStats"]


class CacheWriter(Protocol):
    def write_items(self, items: Sequence[tuple[bytes, bytes]],
                    progress: Callable[[int], None] | None = None) -> WriteStats:
        """Write every (key, value) of a generation; raise ``CacheWriteError`` unless all succeed."""
        ...

    def switch_generation(self, model_version: str, generation: str, sample: Sequence[bytes]) -> str | None:
        """Make ``generation`` the model's active one (after checking ``sample`` keys exist); the previous one."""
        ...


class RunLog(Protocol):
    def start(self, job: str, model_version: str, start: float, end: float) -> int:
        """Record a new running run of the window [start, end); its id."""
        ...

    def update(self, run_id: int, *, offsets: Iterable[tuple[str, int, int, int]] = (), **fields: Any) -> None:
        """Set fields of the run (status, counts, details, ...) and add the offsets it read."""
        ...


@dataclass(frozen=True)
class ActiveModel:
    """The model that scores the entities: its registry version and the loaded model (``predict``, ``explain``)."""

    version: str
    model: Any
    typical_amount: float = 0.0  # the version's typical payment amount (policy "typical_amount"; 0: unknown)
