"""The reference: MLServer (Open Inference Protocol over gRPC) serving the same XGBoost file.

Runs from its own venv (``bench/.venv-mlserver``, pins in ``bench/requirements-mlserver.txt``),
created here on first use with ``uv``. Configurations (see README):

* ``mlserver``       parallel_workers=1, no adaptive batching
* ``mlserver-batch`` parallel_workers=1, adaptive batching (max_batch_size 64, max_batch_time 2 ms)

Both with OMP_NUM_THREADS=1 and the runtime ``mlserver_xgboost.XGBoostModel``, output ``predict``
(the runtime loads a JSON model as an XGBRegressor; with ``binary:logistic`` that is the probability).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BENCH, log, stop, taskset_prefix, wait_grpc_ready

VENV = BENCH / ".venv-mlserver"
REQUIREMENTS = BENCH / "requirements-mlserver.txt"
MODEL_NAME = "fraud-xgb"

CONFIGS = {
    "mlserver": {"parallel_workers": 1, "max_batch_size": 0, "max_batch_time": 0.0},
    "mlserver-batch": {"parallel_workers": 1, "max_batch_size": 64, "max_batch_time": 0.002},
}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    if (VENV / "bin" / "mlserver").is_file():
        return python()
    uv = shutil.which("uv")
    if not uv:
        raise RuntimeError("uv not found: needed to create bench/.venv-mlserver")
    log("creating bench/.venv-mlserver (MLServer reference, pinned)")
    subprocess.run([uv, "venv", str(VENV), "--python", "3.11", "-q"], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python()), "-r", str(REQUIREMENTS)], check=True)
    return python()


def free_port() -> int:
    from tests.servers.common import free_port as fp

    return fp()


@dataclass
class MLServer:
    model_file: Path
    config: str = "mlserver"
    cpus: str | None = None
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    _dir: tempfile.TemporaryDirectory | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def describe(self) -> dict:
        return {"server": "mlserver", "config": self.config, **CONFIGS[self.config], "omp_num_threads": 1,
                "runtime": "mlserver_xgboost.XGBoostModel", "output": "predict", "cpus": self.cpus or "all",
                "model_file": str(self.model_file)}

    def start(self) -> MLServer:
        ensure_venv()
        cfg = CONFIGS[self.config]
        self._dir = tempfile.TemporaryDirectory(prefix="fs-mlserver-")
        root = Path(self._dir.name)
        mdir = root / MODEL_NAME
        mdir.mkdir()
        fname = "model" + (self.model_file.suffix if self.model_file.suffix in (".json", ".ubj", ".bst") else ".json")
        shutil.copy(self.model_file, mdir / fname)  # the runtime picks the format from the suffix
        (root / "settings.json").write_text(json.dumps({
            "http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_endpoint": None,
            "parallel_workers": cfg["parallel_workers"], "debug": False, "logging_level": "WARNING",
            "use_structured_logging": False,
        }))
        ms = {"name": MODEL_NAME, "implementation": "mlserver_xgboost.XGBoostModel",
              "parameters": {"uri": f"./{fname}", "version": "v1"}}
        if cfg["max_batch_size"]:
            ms["max_batch_size"] = cfg["max_batch_size"]
            ms["max_batch_time"] = cfg["max_batch_time"]
        (mdir / "model-settings.json").write_text(json.dumps(ms))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        self.log_path = root / "mlserver.log"
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*taskset_prefix(self.cpus), str(VENV / "bin" / "mlserver"), "start", str(root)],
                                     cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            wait_grpc_ready(self.grpc_port, self.proc, 120, check=self._ready)
        except Exception:
            log(f"mlserver failed; log tail:\n{self.log_path.read_text()[-3000:]}")
            raise
        log(f"mlserver ({self.config}) ready on {self.address} in {time.monotonic() - t0:.1f}s")
        return self

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL_NAME}/ready"
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        stop(self.proc)
        if self._dir is not None:
            self._dir.cleanup()
