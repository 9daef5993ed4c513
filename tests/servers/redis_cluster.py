"""A real 3-primary Redis Cluster (Debian's redis-server + redis-cli) on free loopback ports.

``redis-server --cluster-enabled yes`` x N (each in its own folder, no persistence), then
``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes``, then wait until every node
reports ``cluster_state:ok`` and agrees on the slot map. The cluster bus of a node listens on its
port + 10000, so both ports are checked free. ``move_slot`` migrates one slot (with its keys) to
another node as ``redis-cli --cluster reshard`` does: SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

from tests.servers.common import require_binary, stop_process, wait_for_port


def _free_pair() -> int:
    """A free port p whose cluster-bus port p + 10000 is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class RedisCluster:
    nodes: int = 3
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        """The seed URL: the first node (the clients learn the others from CLUSTER SLOTS)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        server = require_binary("redis-server", "run `make deps` (apt-get install -y redis-server)")
        cli = require_binary("redis-cli", "run `make deps` (apt-get install -y redis-tools)")
        self._dir = tempfile.TemporaryDirectory(prefix="fs-redis-cluster-")
        while len(self.ports) < self.nodes:
            port = _free_pair()
            if port not in self.ports:
                self.ports.append(port)
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [server, "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                 "--save", "", "--appendonly", "no", "--dir", self._dir.name, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL))
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_for_port(port, 10, proc)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float) -> None:
        """Until every node says cluster_state:ok and they all agree on who serves every slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.client(p).cluster("info") for p in self.ports]
                maps = [sorted(map(str, self.client(p).execute_command("CLUSTER", "SLOTS"))) for p in self.ports]
                if all(s.get("cluster_state") == "ok" for s in states) and all(m == maps[0] for m in maps):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become ready")
            time.sleep(0.1)

    def node_id(self, port: int) -> str:
        return str(self.client(port).execute_command("CLUSTER", "MYID").decode())

    def owner_port(self, slot: int) -> int:
        for start, end, primary, *_ in self.client(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(f"slot {slot} is not served")

    def move_slot(self, slot: int, to_port: int, *, finish: bool = True) -> None:
        """Migrate ``slot`` and its keys to the node on ``to_port`` (as ``redis-cli --cluster reshard``).

        ``finish=False`` stops half-way (keys moved, slot still MIGRATING/IMPORTING): the source then
        answers ASK for the moved keys."""
        src_port = self.owner_port(slot)
        src, dst = self.client(src_port), self.client(to_port)
        src_id, dst_id = self.node_id(src_port), self.node_id(to_port)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        if finish:
            for port in self.ports:
                self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            self.wait_ok(15)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        if self._dir is not None:
            self._dir.cleanup()
