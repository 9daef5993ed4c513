"""A test run stopped with SIGTERM stops the servers it started (issue 25: an interrupted `make test`
left two redis-servers and a `fraudscore serve --workers 2` running until killed by hand)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers.common import REPO_ROOT

pytestmark = pytest.mark.integration

SLOW_TEST = '''
import os, time
from pathlib import Path

def test_holds_a_server(redis_server):
    Path(os.environ["FS_PID_FILE"]).write_text(str(redis_server.proc.pid))
    time.sleep(120)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_pytest_stops_the_servers_its_fixtures_started(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(SLOW_TEST)
    pid_file = tmp_path / "redis.pid"
    # tests/conftest.py as a plugin: the session's redis_server fixture and the SIGTERM handler
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_slow.py")],
                           cwd=REPO_ROOT, env={**os.environ, "FS_PID_FILE": str(pid_file)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read() if run.stdout else ""
            time.sleep(0.1)
        redis_pid = int(pid_file.read_text())
        assert _alive(redis_pid)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0 and "KeyboardInterrupt" in out, out
    for _ in range(50):
        if not _alive(redis_pid):
            break
        time.sleep(0.1)
    assert not _alive(redis_pid), f"redis-server {redis_pid} still running after the run ended:\n{out}"
