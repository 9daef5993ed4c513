"""A real PostgreSQL cluster (Debian's package), run as the postgres user (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from tests.servers.common import free_port, wait_for_port


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: run `make deps` (apt-get install -y postgresql)")
    return found[-1]


@dataclass
class PostgresServer:
    port: int = field(default_factory=free_port)
    root: str = ""

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def start(self) -> PostgresServer:
        # Short path the postgres user can traverse (not under /root, not a mode-700 temp dir).
        self.root = tempfile.mkdtemp(prefix="fspg-", dir="/tmp")
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data = os.path.join(self.root, "data")
        subprocess.run(
            self._as_postgres(_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        subprocess.run(
            self._as_postgres(
                _pg_bin("pg_ctl"), "-D", data, "-l", os.path.join(self.root, "log"), "-w", "start", "-o",
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off",
            ),
            check=True, stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 20)
        return self

    def stop(self) -> None:
        if not self.root:
            return
        subprocess.run(
            self._as_postgres(_pg_bin("pg_ctl"), "-D", os.path.join(self.root, "data"), "-m", "fast", "-w", "stop"),
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.root, ignore_errors=True)
