"""A real redis-server (Debian's package) on a free loopback port, no persistence."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field

from tests.servers.common import free_port, require_binary, stop_process, wait_for_port


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()  # e.g. ("--requirepass", "s3cret")
    proc: subprocess.Popen | None = None
    _dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = require_binary("redis-server", "run `make deps` (apt-get install -y redis-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="fs-redis-")
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._dir is not None:
            self._dir.cleanup()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)
