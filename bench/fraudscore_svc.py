"""Our service under test: a real Redis, ``fraudscore train`` + ``fraudscore serve``, a filled cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, grpc_health_serving, log, stop, taskset_prefix, wait_grpc_ready

METHOD = "/fraudscore.v1.FraudScoring/Score"
SOURCE_FIELD, DEGRADED_FIELD = 5, 9  # ScoreResponse.source, .degraded
SOURCES = {"0": "UNSPECIFIED", "1": "CACHE", "2": "MODEL", "3": "FALLBACK"}


def fraudscore_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("fraudscore")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "scoring_service.cli"]


@dataclass
class Environment:
    """Redis + data dir + SQLite registry with an active model (shared by the serve runs)."""

    redis: object = None
    _dir: tempfile.TemporaryDirectory | None = None
    env: dict = field(default_factory=dict)
    model_version: str | None = None
    model_file: Path | None = None
    cache_fill: str = "none"
    cached_customers: set[str] = field(default_factory=set)

    def start(self) -> Environment:
        from tests.servers.redis import RedisServer

        self.redis = RedisServer().start()
        self._dir = tempfile.TemporaryDirectory(prefix="fs-bench-")
        d = Path(self._dir.name)
        self.env = {**os.environ, "FRAUDSCORE_DATA_DIR": str(d), "FRAUDSCORE_DATABASE_URL": f"sqlite:///{d}/fs.db",
                    "REDIS_URL": self.redis.url, "FRAUDSCORE_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1",
                    "OMP_WAIT_POLICY": "PASSIVE",
                    # a database and a Redis are configured, so keys would be required: the load generators
                    # send none (bench/security_cost.py measures TLS and keys)
                    "FRAUDSCORE_AUTH": "off"}
        log(f"redis on {self.redis.url}, data dir {d}")
        return self

    def train(self, data: Path) -> None:
        t0 = time.monotonic()
        r = subprocess.run([*fraudscore_cmd(), "train", "--data", str(data), "--activate"], env=self.env,
                           capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"fraudscore train failed: {r.stderr[-2000:]}")
        from scoring_service import bootstrap
        from scoring_service.config import load_settings

        rec = bootstrap.registry(load_settings(database_url=self.env["FRAUDSCORE_DATABASE_URL"])).active()
        if rec is None:
            raise RuntimeError("fraudscore train registered no active model")
        self.model_version, self.model_file = rec.version, Path(rec.artifact_path)
        log(f"fraudscore train: {rec.version} ({rec.framework}) in {time.monotonic() - t0:.0f}s -> {rec.artifact_path}")

    def fill_cache(self, payments, as_of, customers_of_interest) -> None:
        """``scoring_service.bootstrap.rebuild_cache`` (the nightly run on an in-memory frame, no Kafka)."""
        from scoring_service.config import load_settings

        settings = load_settings(data_dir=Path(self.env["FRAUDSCORE_DATA_DIR"]),
                                 database_url=self.env["FRAUDSCORE_DATABASE_URL"], redis_url=self.redis.url)
        t0 = time.monotonic()
        from scoring_service.bootstrap import rebuild_cache

        rebuild_cache(payments, as_of, settings, redis_url=self.redis.url)
        self.cache_fill = "scoring_service.bootstrap.rebuild_cache"
        log(f"cache filled by rebuild_cache in {time.monotonic() - t0:.0f}s")
        self.cached_customers = self._which_cached(customers_of_interest)
        log(f"{len(self.cached_customers)} of {len(set(customers_of_interest))} traffic customers cached")

    def _which_cached(self, customers) -> set[str]:
        import redis

        from scoring_service.core.cache_layout import CUSTOMER, ONLINE_GENERATION, active_generation_key, entity_key

        r = redis.Redis.from_url(self.redis.url)
        gen = (r.get(active_generation_key(self.model_version)) or ONLINE_GENERATION.encode()).decode()
        ids = sorted(set(customers))
        pipe = r.pipeline(transaction=False)
        for c in ids:
            pipe.exists(entity_key(self.model_version, gen, CUSTOMER, c))
        return {c for c, e in zip(ids, pipe.execute(), strict=True) if e}

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self._dir is not None:
            self._dir.cleanup()


@dataclass
class Service:
    envr: Environment
    mode: str = "cache-first"
    workers: int = 1
    cpus: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # settings of this variant, on top of the environment's
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> dict:
        return {"server": "fraudscore", "mode": self.mode, "workers": self.workers, "cpus": self.cpus or "all",
                "model_version": self.envr.model_version, "cache_fill": self.envr.cache_fill, "settings": self.env}

    def start(self) -> Service:
        from tests.servers.common import free_port

        self.port = free_port()
        logf = open(Path(self.envr.env["FRAUDSCORE_DATA_DIR"]) / f"serve-{self.mode}-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [*taskset_prefix(self.cpus), *fraudscore_cmd(), "serve", "--listen", self.address,
             "--workers", str(self.workers), "--mode", self.mode],
            env={**self.envr.env, **self.env}, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        t0 = time.monotonic()
        wait_grpc_ready(self.port, self.proc, 120, check=lambda: grpc_health_serving(self.address))
        log(f"fraudscore serve ({self.mode}, {self.workers} workers) ready on {self.address} in {time.monotonic() - t0:.1f}s")
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        stop(self.proc)
