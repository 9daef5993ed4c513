"""Running server processes: the event loop, signals, worker processes, the serve loop.

Shared by ``fraudscore serve`` and the benchmark's ceiling server, so both start, forward signals
and stop the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from scoring_service.online.server import ScoringServer

T = TypeVar("T")


def run_event_loop(coro: Coroutine[Any, Any, T], kind: str = "uvloop") -> T:
    """Run ``coro`` to completion on a new event loop: uvloop, or the standard one."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def until_signalled() -> None:
    """Return once the process gets SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def join_workers(procs: Sequence[BaseProcess]) -> list[int | None]:
    """Wait for started worker processes, passing SIGTERM/SIGINT on to them; their exit codes."""

    def _forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


async def serve_until_signalled(server: ScoringServer, metrics_port: int | None = None, metrics_addr: str = "") -> None:
    """Start ``server`` (and the Prometheus endpoint when a port is given), serve until SIGTERM/SIGINT, stop."""
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_addr or "0.0.0.0")
    await server.start()
    await until_signalled()
    await server.stop()
