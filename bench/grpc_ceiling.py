"""The ceiling: a grpc.aio server of our Score() contract that does no work and answers a constant.

    python -m bench.grpc_ceiling --listen 127.0.0.1:PORT [--workers 2]

It parses each ScoreRequest (any server must) and returns one prebuilt ScoreResponse: no
validation, no Redis, no model, no logging, no metrics. Its workers share the port with
SO_REUSEPORT, as ``fraudscore serve --workers`` does, and run on the same event loop as the
service. Driven by the same load generator as the real servers, it shows what one Python gRPC
stack costs on this machine, so that the other rows can be read against it: no Python gRPC
server of this contract can answer faster than this one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass


def _response():
    from scoring_service.protos import scoring_pb2

    # The size and shape of a real cache-hit answer: three reasons and a scored_at time.
    r = scoring_pb2.ScoreResponse(request_id="00000000-0000-4000-8000-000000000000", transaction_id="1234567",
                                  risk_score=0.0123, decision=scoring_pb2.APPROVE, source=scoring_pb2.CACHE,
                                  model_version="xgb-20261123T000000000", degraded=False, latency_ms=0.2)
    for code in ("CUSTOMER_RISK", "TERMINAL_RISK", "AMOUNT_HIGH_VS_CUSTOMER_USUAL"):
        r.reasons.add(code=code, feature=code.lower(), contribution=0.1)
    r.scored_at.seconds = 1_535_000_000
    return r


async def _serve(listen: str) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from scoring_service.online.runtime import until_signalled
    from scoring_service.protos import scoring_pb2_grpc

    answer = _response()

    class Constant(scoring_pb2_grpc.FraudScoringServicer):
        async def Score(self, request, context):  # noqa: N802
            return answer

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    scoring_pb2_grpc.add_FraudScoringServicer_to_server(Constant(), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    await until_signalled()
    await server.stop(1)


def _worker(listen: str) -> None:
    from scoring_service.online.runtime import run_event_loop

    run_event_loop(_serve(listen))


@dataclass
class CeilingServer:
    """The bench's handle on ``python -m bench.grpc_ceiling`` (started like ``fraudscore serve``)."""

    workers: int = 1
    cpus: str | None = None
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> dict:
        return {"server": "grpc.aio constant answer (bench/grpc_ceiling.py)", "workers": self.workers,
                "cpus": self.cpus or "all", "event_loop": "uvloop"}

    def start(self) -> CeilingServer:
        from bench.common import REPO, grpc_health_serving, log, taskset_prefix, wait_grpc_ready
        from tests.servers.common import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([*taskset_prefix(self.cpus), sys.executable, "-m", "bench.grpc_ceiling",
                                      "--listen", self.address, "--workers", str(self.workers)], cwd=REPO)
        t0 = time.monotonic()
        wait_grpc_ready(self.port, self.proc, 60, check=lambda: grpc_health_serving(self.address))
        log(f"grpc ceiling ({self.workers} workers) ready on {self.address} in {time.monotonic() - t0:.1f}s")
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        from bench.common import stop

        stop(self.proc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpc_ceiling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.listen,), name=f"ceiling-{i}") for i in range(args.workers)]
    for p in procs:
        p.start()
    from scoring_service.online.runtime import join_workers

    return 0 if all(code == 0 for code in join_workers(procs)) else 1


if __name__ == "__main__":
    sys.exit(main())
