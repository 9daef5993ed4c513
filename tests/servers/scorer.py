"""The real scoring service, started as `fraudscore serve` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service.protos import scoring_pb2_grpc
from tests.servers.common import REPO_ROOT, free_port, stop_process


def serve_command(address: str, *args: str) -> list[str]:
    """The command line of `fraudscore serve` on ``address``, run by this interpreter."""
    return [sys.executable, "-m", "scoring_service.cli", "serve", "--listen", address, *args]


def children(pid: int) -> list[int]:
    """The pids of the live processes whose parent is ``pid`` (from /proc: Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class ScorerProcess:
    data_dir: Path
    redis_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    # TLS (tests/e2e/test_tls.py): the CA that signed the server's certificate, and a client
    # certificate and key for mutual TLS, used by wait_serving's health checks and channel().
    tls_ca: Path | None = None
    client_cert: tuple[Path, Path] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        # Authentication off unless a test turns it on (env): the functional tests call without keys.
        # The callers' clock: most tests replay timelines of their own (handbook days, bursts stamped
        # seconds apart), as a backtest does; tests of the live clock (test_steering.py) set "service".
        env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(self.data_dir), "FRAUDSCORE_LOG_FORMAT": "json",
               "OMP_WAIT_POLICY": "PASSIVE", "FRAUDSCORE_AUTH": "off", "FRAUDSCORE_CLOCK": "event", **self.env}
        env.pop("REDIS_URL", None)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env

    def start(self, timeout: float = 120.0) -> ScorerProcess:
        self.log_path = self.data_dir / f"scorer-{self.port}-{uuid.uuid4().hex[:6]}.log"  # one per process
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(serve_command(self.address, *self.args), cwd=REPO_ROOT, env=self.environment(),
                                     stdout=log, stderr=subprocess.STDOUT)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"scorer exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"scorer not SERVING after {timeout}s:\n{self.logs()[-4000:]}")

    def channel(self, **options: object) -> grpc.Channel:
        """A channel to the server: TLS when ``tls_ca`` is set (with ``client_cert`` for mutual TLS)."""
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address, options=list(options.items()))
        cert, key = self.client_cert or (None, None)
        creds = grpc.ssl_channel_credentials(self.tls_ca.read_bytes(), key.read_bytes() if key else None,
                                             cert.read_bytes() if cert else None)
        return grpc.secure_channel(self.address, creds, options=list(options.items()))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_events(self, event: str | None = None) -> list[dict]:
        """The JSON log lines (``event`` only, when given), in order."""
        out = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                out.append(record)
        return out

    def stub(self, channel: grpc.Channel) -> scoring_pb2_grpc.FraudScoringStub:
        return scoring_pb2_grpc.FraudScoringStub(channel)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process has ended (TimeoutExpired after ``timeout`` s)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def worker_pids(self) -> list[int]:
        """The live worker processes of ``--workers N`` (multiprocessing children, not its resource tracker)."""
        assert self.proc is not None
        pids = []
        for pid in children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return sorted(pids)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
