"""Driving a server: builds ``fsload`` (bench/loadgen, Go) and installs ghz into .cache/go-bin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import BENCH, GO_BIN, log, taskset_prefix, tree_cpu_seconds
from fraudscore_client._throttle import DEFAULT_WINDOW_S

GHZ_VERSION = "v0.120.0"


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    if not go:
        raise RuntimeError("Go not found (needed to build bench/loadgen and install ghz)")
    return go


def fsload() -> Path:
    exe = GO_BIN / "fsload"
    src = BENCH / "loadgen"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if not exe.is_file() or exe.stat().st_mtime < newest:
        GO_BIN.mkdir(parents=True, exist_ok=True)
        log("building bench/loadgen -> .cache/go-bin/fsload")
        subprocess.run([_go(), "build", "-o", str(exe), "."], cwd=src, check=True,
                       env={**os.environ, "CGO_ENABLED": "0"})
    return exe


def ghz() -> Path:
    exe = GO_BIN / "ghz"
    if not exe.is_file():
        GO_BIN.mkdir(parents=True, exist_ok=True)
        log(f"installing ghz {GHZ_VERSION} -> .cache/go-bin (about a minute cold)")
        subprocess.run([_go(), "install", f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}"], check=True,
                       env={**os.environ, "GOBIN": str(GO_BIN)})
    return exe


def run_fsload(*, addr: str, method: str, data: Path, mode: str, server_pids: list[int], concurrency: int = 1,
               rps: float = 0, duration: float = 10, warmup: float = 2, conns: int = 1, offset: int = 0,
               cpus: str | None = None, enum_field: int = 0, flag_field: int = 0, timeout: float = 2.0,
               extra_pids: dict[str, list[int]] | None = None, throttle_k: float = 0.0,
               throttle_window_s: float = DEFAULT_WINDOW_S, send_timeout: bool = True) -> dict:
    """One load run; adds CPU seconds per 1,000 requests of the server (and of ``extra_pids``) and of the loader."""
    args = [*taskset_prefix(cpus), str(fsload()), "-addr", addr, "-method", method, "-data", str(data),
            "-mode", mode, "-c", str(concurrency), "-rps", str(rps), "-conns", str(conns),
            "-duration", f"{duration}s", "-warmup", f"{warmup}s", "-offset", str(offset), "-timeout", f"{timeout}s",
            "-enum-field", str(enum_field), "-flag-field", str(flag_field)]
    if throttle_k:  # callers with fraudscore_client's adaptive throttling (fraudscore_client/_throttle.py)
        args += ["-throttle-k", str(throttle_k), "-throttle-window", str(round(throttle_window_s))]
    if not send_timeout:  # callers that do not send x-fraudscore-timeout-ms (not fraudscore_client)
        args += ["-send-timeout=false"]
    env = {**os.environ}
    if cpus:
        env["GOMAXPROCS"] = str(len(cpus.split(",")))
    cpu0 = tree_cpu_seconds(server_pids)
    extra0 = {k: tree_cpu_seconds(v) for k, v in (extra_pids or {}).items()}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    wall = time.monotonic() - t0
    cpu1 = tree_cpu_seconds(server_pids)
    if proc.returncode != 0:
        raise RuntimeError(f"fsload failed ({proc.returncode}): {err.decode()[-2000:]}")
    res = json.loads(out)
    n = max(res["requests_total"], 1)
    res["server_cpu_s"] = cpu1 - cpu0
    res["server_cpu_s_per_1k"] = (cpu1 - cpu0) / n * 1000
    for k, v in (extra_pids or {}).items():
        c = tree_cpu_seconds(v) - extra0[k]
        res[f"{k}_cpu_s_per_1k"] = c / n * 1000
    res["loadgen_cpu_s_per_1k"] = (ru.ru_utime + ru.ru_stime) / n * 1000
    res["loadgen_cpus"] = cpus or "all"
    res["run_wall_s"] = wall
    return res
