"""The real scoring service, started as `fraudscore serve` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scoring_service.protos import scoring_pb2_grpc
from tests.servers.common import REPO_ROOT, free_port, stop_process


@dataclass
class ScorerProcess:
    data_dir: Path
    redis_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ScorerProcess:
        env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(self.data_dir), "FRAUDSCORE_LOG_FORMAT": "json",
               "OMP_WAIT_POLICY": "PASSIVE", **self.env}
        env.pop("REDIS_URL", None)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        self.log_path = self.data_dir / f"scorer-{self.port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scoring_service.cli", "serve", "--listen", self.address, *self.args],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
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

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stub(self, channel: grpc.Channel) -> scoring_pb2_grpc.FraudScoringStub:
        return scoring_pb2_grpc.FraudScoringStub(channel)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
