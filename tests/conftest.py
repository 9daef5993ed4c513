"""Shared fixtures: real servers, started once per session and stopped at the end."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.common import REPO_ROOT
from tests.servers.redis import TEST_CACHE_MAC_KEYS

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One cache MAC key for the session's scorers and batch runs (tests/servers/redis.py: sealed_item).
os.environ.setdefault("FRAUDSCORE_CACHE_MAC_KEYS", TEST_CACHE_MAC_KEYS)


def _interrupted(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the run at once
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI job cancelled, `timeout`, `kill`) ends the run as Ctrl-C does: pytest then tears
    # down every fixture, so the servers the run started (Redis, Kafka, scorers) are stopped with it.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def handbook_path() -> Path | None:
    path = Path(
        os.environ.get(
            "FRAUDSCORE_HANDBOOK",
            REPO_ROOT.parent / "shared" / "data" / "handbook" / "transactions-2018-04-01_2018-08-31.parquet",
        )
    )
    return path if path.exists() else None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    from tests.servers.redis import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:  # type: ignore[no-untyped-def]
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    from tests.servers.postgres import PostgresServer

    server = PostgresServer().start()
    yield server.url
    server.stop()
