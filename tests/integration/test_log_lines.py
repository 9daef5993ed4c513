"""Every log line whole (issue 27): 4 worker processes and their parent log a burst at once, some
lines longer than a pipe's atomic write, into one file and into one pipe; every line must parse as
one JSON object and none may be lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.servers.common import REPO_ROOT

WORKERS = 4
LINES = 10_000


def _burst(stderr: object, *extra: str) -> subprocess.Popen:
    # PYTHONUNBUFFERED as our image and many CI runners set it: print() then wrote the text and its
    # newline in two calls, and two processes' events shared a line.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.servers.log_burst", "--workers", str(WORKERS),
                             "--lines", str(LINES), *extra], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def _check(raw: bytes) -> None:
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    broken = []
    per_worker: Counter[str] = Counter()
    for n, line in enumerate(lines):
        try:
            event = json.loads(line)
        except ValueError:
            broken.append(f"line {n}: {line[:120]!r}...")
            continue
        assert isinstance(event, dict) and event["event"] == "burst.line", line[:200]
        per_worker[event["worker"]] += 1
    assert not broken, f"{len(broken)} of {len(lines)} lines are not one JSON object:\n" + "\n".join(broken[:5])
    assert per_worker == {**{f"w{i}": LINES for i in range(WORKERS)}, "parent": LINES}


def test_workers_lines_reach_one_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "burst.log"
    with open(path, "ab") as sink:  # as tests/servers/scorer.py and a shell's >> open it
        proc = _burst(sink)
        assert proc.wait(timeout=300) == 0
    _check(path.read_bytes())


def test_workers_lines_reach_one_pipe_whole() -> None:
    proc = _burst(subprocess.PIPE)
    _, out = proc.communicate(timeout=300)
    assert proc.returncode == 0
    _check(out)
