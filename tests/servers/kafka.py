"""A real Apache Kafka 4.4.0 broker (KRaft, one combined node) on free loopback ports.

The jars come from Maven Central through ``scripts/kafka/pom.xml`` into
``.cache/kafka-4.4.0/libs`` (git-ignored, reused between runs: ~2 s with a warm ``~/.m2``).
Retention is off (``log.retention.ms=-1``): the handbook's events carry 2018 timestamps, which the
default 7-day retention would delete within a minute of start.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.common import CACHE_DIR, REPO_ROOT, free_port, require_binary, wait_for_port

KAFKA_VERSION = "4.4.0"
KAFKA_DIR = CACHE_DIR / f"kafka-{KAFKA_VERSION}"
POM = REPO_ROOT / "scripts" / "kafka" / "pom.xml"
LOG4J = REPO_ROOT / "scripts" / "kafka" / "log4j2.yaml"


def kafka_libs() -> Path:
    """The broker's jars, fetched once with Maven (a lock file keeps parallel sessions apart)."""
    libs = KAFKA_DIR / "libs"
    marker = KAFKA_DIR / ".complete"
    if marker.exists():
        return libs
    mvn = require_binary("mvn", "install Maven and Java 17 (apt-get install -y maven openjdk-17-jre-headless)")
    KAFKA_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs.", dir=KAFKA_DIR))
    try:
        subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
        )
        if not any(tmp.glob("kafka_2.13-*.jar")):
            raise RuntimeError(f"maven fetched no Kafka jars into {tmp}")
        try:
            tmp.rename(libs)
        except OSError:  # another process won the race: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
        marker.touch()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"fetching Kafka jars failed:\n{exc.stdout.decode(errors='replace')[-2000:]}") from exc
    return libs


def _cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclass
class KafkaServer:
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    heap: str = "512m"
    proc: subprocess.Popen | None = None
    root: str = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _properties(self, data: str) -> str:
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.ms=-1",
            "log.retention.bytes=-1",
            "auto.create.topics.enable=false",
            "",
        ])

    def start(self, timeout: float = 60) -> KafkaServer:
        java = require_binary("java", "install Java 17 (apt-get install -y openjdk-17-jre-headless)")
        libs = kafka_libs()
        self.root = tempfile.mkdtemp(prefix="fs-kafka-")
        data = os.path.join(self.root, "data")
        props = os.path.join(self.root, "server.properties")
        Path(props).write_text(self._properties(data))
        cp = f"{libs}/*"
        jvm = [f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={self.root}"]
        subprocess.run(
            [java, *jvm, "-cp", cp, "kafka.tools.StorageTool", "format", "--standalone",
             "-t", _cluster_id(), "-c", props],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
        )
        self.proc = subprocess.Popen(
            [java, f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Djava.awt.headless=true", *jvm, "-cp", cp, "kafka.Kafka", props],
            stdout=open(os.path.join(self.root, "stdout.log"), "wb"), stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout, self.proc)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """The port opens before the broker serves metadata: wait until it lists topics."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka at {self.bootstrap} did not become ready in {timeout}s")
            time.sleep(0.2)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.root, "stdout.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then wait until the process is really gone (a zombie counts as gone)."""
        if self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
            self.proc.terminate()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None or _gone_or_zombie(pid):
                    break
                time.sleep(0.1)
            else:
                self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""


def _gone_or_zombie(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return "Z" in line.split()[1]
    except OSError:
        return True
    return False


if __name__ == "__main__":  # python -m tests.servers.kafka: start one for manual runs, Ctrl-C stops it
    server = KafkaServer().start()
    print(f"KAFKA_BOOTSTRAP_SERVERS={server.bootstrap}", flush=True)
    try:
        while server.proc and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
