"""A burst of log lines from N worker processes started the way ``fraudscore serve --workers N``
starts its workers (``LogRelay.process``, spawn), while the parent logs too.

``python -m tests.servers.log_burst --workers 4 --lines 10000``: every worker logs ``--lines``
events (every ``--long-every``-th one longer than a pipe's atomic write, 4 KiB), the parent logs
``--lines`` of its own meanwhile; stderr is wherever the caller points it (a file, a pipe).
``--direct`` starts the workers without the relay, on the inherited stderr (the old way).
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading

from scoring_service.logging import LogRelay, configure_logging, get_logger

LONG_PAD = 5000  # characters: past PIPE_BUF (4096), so one line needs more than one atomic pipe write


def burst(worker: str, lines: int, long_every: int) -> None:
    configure_logging("json", "info")
    log = get_logger("burst")
    for seq in range(lines):
        pad = "x" * LONG_PAD if long_every and seq % long_every == 0 else ""
        log.info("burst.line", worker=worker, seq=seq, pad=pad)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--long-every", type=int, default=50)
    parser.add_argument("--direct", action="store_true")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    relay = LogRelay()
    procs = []
    for i in range(args.workers):
        burst_args = (f"w{i}", args.lines, args.long_every)
        if args.direct:
            proc = ctx.Process(target=burst, args=burst_args)
            proc.start()
        else:
            proc = relay.process(ctx, burst, burst_args)
        procs.append(proc)
    parent = threading.Thread(target=burst, args=("parent", args.lines, args.long_every))
    parent.start()
    parent.join()
    for proc in procs:
        proc.join()
    relay.join()
    raise SystemExit(max(abs(p.exitcode or 0) for p in procs))


if __name__ == "__main__":
    main()
