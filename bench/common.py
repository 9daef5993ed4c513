"""Shared helpers: paths, processes, CPU accounting from /proc, pinning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CACHE_DIR = REPO / ".cache" / "bench"
GO_BIN = REPO / ".cache" / "go-bin"


def _handbook() -> Path:
    """FRAUDSCORE_HANDBOOK, else where ``fraudscore data handbook`` writes by default (run from the repo:
    ``<FRAUDSCORE_DATA_DIR or var>/handbook/transactions-2018-04-01_2018-08-31.parquet``).

    A checkout beside an older ``shared/data/handbook`` copy keeps using it until the download exists,
    so results stay comparable with bench/HISTORY.md instead of silently switching to simulated traffic."""
    from scoring_service.adapters.files.handbook_download import default_output

    if os.environ.get("FRAUDSCORE_HANDBOOK"):
        return Path(os.environ["FRAUDSCORE_HANDBOOK"])
    data_dir = Path(os.environ.get("FRAUDSCORE_DATA_DIR", "var"))
    downloaded = default_output(data_dir if data_dir.is_absolute() else REPO / data_dir)
    legacy = REPO.parent / "shared" / "data" / "handbook" / downloaded.name
    return legacy if not downloaded.is_file() and legacy.is_file() else downloaded


HANDBOOK = _handbook()
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime seconds) of a live process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0] = state (field 3); utime = field 14, stime = field 15, cutime/cstime 16/17
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks / CLK_TCK


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user+system, incl. reaped children) of the process trees under ``roots``."""
    total = 0.0
    seen: set[int] = set()
    for r in roots:
        for p in tree_pids(r):
            if p in seen:
                continue
            seen.add(p)
            st = _stat(p)
            if st:
                total += st[1]
    return total


def taskset_prefix(cpus: str | None) -> list[str]:
    if not cpus or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpus]


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def grpc_health_serving(address: str) -> bool:
    """True when the gRPC health service at ``address`` says SERVING for the whole server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def wait_grpc_ready(port: int, proc: subprocess.Popen, timeout: float, check=None) -> None:
    """Wait for the port, then (optionally) for ``check()`` to return True."""
    from tests.servers.common import wait_for_port

    wait_for_port(port, timeout, proc)
    if check is None:
        return
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"server on {port} not ready after {timeout}s ({last})")
