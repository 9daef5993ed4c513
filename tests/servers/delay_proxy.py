"""A TCP proxy for fault tests: forwards loopback connections to a server (Redis), with faults switched at run time.

Modes (``DelayProxy.set_mode``), applied to every connection, open or new:

* ``pass``: bytes go through as they come.
* ``delay``: every chunk, in each direction, leaves ``delay_s`` after it arrived (order kept, no
  throughput cap: a pipelined client sees its replies late, not fewer of them). A round trip costs
  at least 2 x ``delay_s``.
* ``blackhole``: connections are accepted and read, nothing is forwarded either way (a hung
  server, or a route that drops packets): the client waits until its own timeout.
* ``reset``: every open connection is closed with a TCP RST (SO_LINGER 0), and new ones are reset
  as soon as they are accepted (a server that crashed and a port that is refused would give
  ECONNREFUSED instead; this is the "connection reset by peer" case).

It runs an asyncio loop in a daemon thread, so a synchronous test drives it::

    proxy = DelayProxy(redis.port).start()
    proxy.set_mode("delay", delay_s=0.05)
    ...
    proxy.stop()

``python -m tests.servers.delay_proxy UPSTREAM_PORT MODE [DELAY_MS]`` runs one by hand.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tests.servers.common import free_port

Mode = Literal["pass", "delay", "blackhole", "reset"]
MODES: tuple[Mode, ...] = ("pass", "delay", "blackhole", "reset")
_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for t in self.tasks:
            t.cancel()
        _reset(self.client)
        self.upstream.transport.abort()


class DelayProxy:
    """Listens on ``127.0.0.1:port`` and forwards to ``127.0.0.1:upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.counts: Counter[str] = Counter()  # connections, resets, chunks forwarded and dropped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        """A Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    # ---- control (any thread)
    def start(self) -> DelayProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"delay-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"delay proxy on {self.port} did not start")
        return self

    def set_mode(self, mode: Mode, delay_s: float | None = None) -> None:
        """Switch every connection (open and new) to ``mode``; ``delay_s`` for ``delay``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if delay_s is not None:
            self.delay_s = delay_s
        self.mode = mode
        if mode == "reset":
            self._call(self._reset_all)

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop.close()
        self._loop = None

    def _call(self, fn: object) -> None:
        """Run ``fn`` (a coroutine function) on the proxy's loop and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(fn(), self._loop).result(5)  # type: ignore[operator]

    # ---- the loop's side
    async def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()
            self.counts["resets"] += 1
        self._links.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        if self.mode == "reset":
            self.counts["resets"] += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.counts["upstream_refused"] += 1
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [asyncio.create_task(self._pump(reader, up_writer, link)),
                      asyncio.create_task(self._pump(up_reader, writer, link))]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for w in (writer, up_writer):
            if not w.is_closing():
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link) -> None:
        """Copy ``src`` to ``dst``; in ``delay`` mode each chunk waits its delay in a queue (order kept)."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, chunk = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.mode == "blackhole":  # switched while it waited
                    self.counts["chunks_dropped"] += 1
                    continue
                dst.write(chunk)
                await dst.drain()
                self.counts["chunks_forwarded"] += 1

        sender = asyncio.create_task(send())
        try:
            while chunk := await src.read(_CHUNK):
                if self.mode == "blackhole":
                    self.counts["chunks_dropped"] += 1
                    continue
                queue.put_nowait((time.monotonic() + (self.delay_s if self.mode == "delay" else 0.0), chunk))
            await queue.put(None)
            await sender
            if not dst.is_closing() and dst.can_write_eof():
                dst.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            link.reset()
        finally:
            sender.cancel()


if __name__ == "__main__":  # a proxy by hand: python -m tests.servers.delay_proxy 6379 delay 50
    import sys

    p = DelayProxy(int(sys.argv[1])).start()
    p.set_mode(sys.argv[2] if len(sys.argv) > 2 else "pass", float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else None)  # type: ignore[arg-type]
    print(f"127.0.0.1:{p.port} -> 127.0.0.1:{sys.argv[1]} ({p.mode}, {p.delay_s * 1000:.0f} ms)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        p.stop()
