"""Running server processes: the event loop, signals and the drain, worker supervision, the port claim.

Shared by ``fraudscore serve`` and the benchmark's ceiling server, so both start, forward signals
and stop the same way.

* One server process serves until SIGTERM/SIGINT, then drains (``ScoringServer.stop``): health
  NOT_SERVING at once, still serving for the drain period, then in-flight calls finish. A second
  signal cuts the drain short (the calls in flight still finish).
* ``--workers N``: the parent supervises the workers (``join_workers``): one that dies is
  restarted after an exponential, capped backoff (logged, counted); SIGTERM/SIGINT is forwarded
  to every worker, which drain, and the parent returns once they have all exited. A worker dies
  with its parent: ``die_with_parent`` (Linux ``PR_SET_PDEATHSIG``) and a watch of the parent pid.
* Lost capacity (``--workers N``): health is per process (under SO_REUSEPORT a check reaches
  whichever worker the kernel picks, never a dead one), so a survivor keeps answering SERVING for
  ``""`` and the scoring service: it can serve. What it adds is the health service
  ``fraudscore.capacity``: SERVING while all N workers serve, NOT_SERVING while fewer do (one
  died and its replacement is not serving yet), and the gauges ``fraudscore_workers_serving`` /
  ``fraudscore_workers_expected`` on every worker's metrics port. Each worker marks itself in a
  folder named after the parent (``capacity_dir``) once it serves, and unmarks itself when it
  starts draining; the parent writes the expected count there and removes a dead worker's mark.
* ``claim_port``: a second server on a port already served is refused (the workers share theirs
  through SO_REUSEPORT, which would otherwise let any other process take part of the connections).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_any
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

from grpc_health.v1 import health_pb2
from prometheus_client import Gauge

from scoring_service.logging import get_logger
from scoring_service.online.server import ScoringServer

T = TypeVar("T")
log = get_logger(__name__)

_PARENT_POLL_S = 0.5
_SIGNAL_REPEAT_S = 0.5
CAPACITY_SERVICE = "fraudscore.capacity"  # health: SERVING while every worker of --workers N serves
WORKERS_SERVING = Gauge("fraudscore_workers_serving", "Workers of this server (--workers N) serving now.")
WORKERS_EXPECTED = Gauge("fraudscore_workers_expected", "Workers this server runs when none is missing (N).")


def capacity_dir(parent_pid: int) -> Path:
    """Where the workers of the supervisor ``parent_pid`` mark themselves serving (``<pid>``) and it
    writes how many it runs (``expected``)."""
    return Path(tempfile.gettempdir()) / f"fraudscore-workers-{parent_pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def workers_serving(folder: Path) -> tuple[int, int] | None:
    """(serving, expected) from a supervisor's capacity folder; None when it has none."""
    try:
        expected = int((folder / "expected").read_text())
        marks = [int(n) for n in os.listdir(folder) if n.isdigit()]
    except (OSError, ValueError):
        return None
    return sum(1 for pid in marks if _pid_alive(pid)), expected


async def _watch_capacity(server: ScoringServer, mark: Path, stop: asyncio.Event) -> None:
    """A worker's part in the capacity count: its mark once it serves, and its view of the whole
    (gauges and the ``fraudscore.capacity`` health status). Nothing while the parent has no folder."""
    last: tuple[int, int] | None = None
    while not stop.is_set():
        if mark.parent.is_dir():
            if server.scorer.serving is not None and not mark.exists():
                mark.touch()
            seen = await asyncio.to_thread(workers_serving, mark.parent)
            if seen is not None and seen != last:
                serving, expected = seen
                WORKERS_SERVING.set(serving)
                WORKERS_EXPECTED.set(expected)
                full = serving >= expected
                await server.health.set(CAPACITY_SERVICE, health_pb2.HealthCheckResponse.SERVING if full
                                        else health_pb2.HealthCheckResponse.NOT_SERVING)
                (log.info if full else log.warning)("server.capacity", workers_serving=serving,
                                                    workers_expected=expected, pid=os.getpid())
                last = seen
        try:
            await asyncio.wait_for(stop.wait(), _PARENT_POLL_S)
        except TimeoutError:
            pass


def run_event_loop(coro: Coroutine[Any, Any, T], kind: str = "uvloop") -> T:
    """Run ``coro`` to completion on a new event loop: uvloop, or the standard one."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _stop_events() -> tuple[asyncio.Event, asyncio.Event]:
    """Two events set by SIGTERM/SIGINT on the running loop: ``stop`` by the first, ``hurry`` by a
    later one. Signals within ``_SIGNAL_REPEAT_S`` of the first count as the same request: Ctrl-C
    reaches a worker both from the terminal and from its parent, and a parent's death can raise
    PR_SET_PDEATHSIG more than once (the child is handed from thread to thread of the dying parent)."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    first = 0.0

    def _on_signal() -> None:
        nonlocal first
        if not stop.is_set():
            first = time.monotonic()
            stop.set()
        elif time.monotonic() - first >= _SIGNAL_REPEAT_S:
            hurry.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal)
    return stop, hurry


async def until_signalled() -> None:
    """Return once the process gets SIGTERM or SIGINT."""
    stop, _ = _stop_events()
    await stop.wait()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once the process that started this one is gone (its orphans are adopted by another)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("server.parent_gone", parent_pid=parent_pid, pid=os.getpid())
            stop.set()
            return
        await asyncio.sleep(_PARENT_POLL_S)


async def serve_until_signalled(server: ScoringServer, metrics_port: int | None = None, metrics_addr: str = "",
                                parent_pid: int | None = None) -> None:
    """Start ``server`` (and the Prometheus endpoint when a port is given), serve until SIGTERM/SIGINT
    (or, for a worker, until its parent ``parent_pid`` is gone), then drain and stop."""
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_addr or "0.0.0.0")
    stop, hurry = _stop_events()
    await server.start()
    watches = []
    mark = capacity_dir(parent_pid) / str(os.getpid()) if parent_pid else None
    if parent_pid and mark is not None:
        watches.append(asyncio.create_task(_watch_parent(parent_pid, stop)))
        watches.append(asyncio.create_task(_watch_capacity(server, mark, stop)))
    await stop.wait()
    if mark is not None:
        mark.unlink(missing_ok=True)  # draining: no longer capacity
    for watch in watches:
        watch.cancel()
    await server.stop(hurry=hurry)


# ---- worker processes
def die_with_parent(parent_pid: int) -> None:
    """In a worker, at start: get SIGTERM (a drain) when the parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("server.pdeathsig_failed", errno=ctypes.get_errno())
    if os.getppid() != parent_pid:  # died before prctl: no signal will come
        raise SystemExit(0)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How soon a dead worker is started again: ``first_s``, doubled on each death in a row, at most
    ``max_s``; a worker that lived ``stable_s`` starts the sequence over."""

    first_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, deaths_in_a_row: int) -> float:
        return min(self.max_s, self.first_s * 2 ** max(deaths_in_a_row - 1, 0))


def join_workers(procs: Sequence[BaseProcess], restart: Callable[[int], BaseProcess] | None = None, *,
                 policy: RestartPolicy = RestartPolicy(), stop_timeout_s: float | None = None) -> list[int | None]:
    """Supervise started worker processes until they have all exited; their last exit codes.

    SIGTERM/SIGINT are forwarded to every live worker (each drains and exits); from then on nothing
    is restarted. With ``restart`` (slot index -> a started process), a worker that exits before
    that is replaced after ``policy``'s backoff; without, the call just waits. ``stop_timeout_s``:
    workers still alive that long after the first signal are killed (SIGKILL).
    """
    slots = list(procs)
    started = [time.monotonic()] * len(slots)
    deaths = [0] * len(slots)
    due: dict[int, float] = {}  # slot -> when its replacement starts
    restarts = 0
    signals = 0
    forwarded = 0
    stopping_since: float | None = None

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    capacity = capacity_dir(os.getpid())
    capacity.mkdir(exist_ok=True)
    (capacity / "expected").write_text(str(len(slots)))
    try:
        while True:
            now = time.monotonic()
            if signals > forwarded:  # forwarded here, not in the handler: a worker started meanwhile gets it too
                forwarded = signals
                if stopping_since is None:
                    stopping_since = now
                    due.clear()
                    log.info("server.workers_stopping", pids=[p.pid for p in slots if p.is_alive()])
                for p in slots:
                    if p.is_alive() and p.pid:
                        os.kill(p.pid, signal.SIGTERM)
            if restart is not None and stopping_since is None:
                for i, p in enumerate(slots):
                    if i in due:
                        if now >= due[i]:
                            del due[i]
                            slots[i] = restart(i)
                            started[i] = time.monotonic()
                            log.info("server.worker_restarted", slot=i, pid=slots[i].pid, restarts=restarts)
                    elif not p.is_alive():
                        lived = now - started[i]
                        deaths[i] = 1 if lived >= policy.stable_s else deaths[i] + 1
                        delay = policy.delay(deaths[i])
                        restarts += 1
                        due[i] = now + delay
                        (capacity / str(p.pid)).unlink(missing_ok=True)  # a killed worker could not unmark itself
                        log.error("server.worker_died", slot=i, pid=p.pid, exitcode=p.exitcode, lived_s=round(lived, 1),
                                  restart_in_s=delay, deaths_in_a_row=deaths[i], restarts=restarts)
            live = [p for p in slots if p.is_alive()]
            if not live and not due:
                break
            if stopping_since is not None and stop_timeout_s is not None and now - stopping_since > stop_timeout_s:
                log.error("server.workers_killed", pids=[p.pid for p in live], after_s=stop_timeout_s)
                for p in live:
                    p.kill()
                stop_timeout_s = None
            timeout = max(0.0, min([0.2, *(t - time.monotonic() for t in due.values())]))
            if live:
                wait_for_any([p.sentinel for p in live], timeout)  # wakes up as soon as one exits
            else:
                time.sleep(timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(capacity, ignore_errors=True)
    return [p.exitcode for p in slots]


# ---- the port
class PortInUse(RuntimeError):
    """Another process already serves the port (or another ``fraudscore serve`` is starting on it)."""


def _host_port(listen: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``) split; None for what is not a TCP address (``unix:path``)."""
    host, _, port = listen.rpartition(":")
    if listen.startswith("unix") or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def claim_port(listen: str) -> socket.socket | None:
    """Refuse a port another process serves: PortInUse, else a lock to keep while serving (None: no lock).

    Two checks: a plain bind of the address (no SO_REUSEPORT), which fails while any process listens
    there; and, on Linux, an abstract Unix socket named after the address, held by this process, so
    that two servers starting at the same time (before either listens) cannot both pass.
    """
    address = _host_port(listen)
    if address is None or address[1] == 0:
        return None  # not TCP, or an ephemeral port: nothing to share
    host, port = address
    lock: socket.socket | None = None
    if sys.platform.startswith("linux"):
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0fraudscore.serve.{host}:{port}")
        except OSError as exc:
            lock.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{listen}: another `fraudscore serve` already serves this address") from None
            lock = None
    try:
        try:
            addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror:
            addresses = []  # the server's own bind reports it
        for family, kind, proto, _, addr in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(addr)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortInUse(f"{listen}: port {port} is already served by another process") from None
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock
