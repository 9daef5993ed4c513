"""ScoreBatch of new cards against the real service: wall time and the server's latency_ms.

    uv run python -m bench.score_batch [--sizes 100,1000] [--calls 30] [--workers 1] [--service-env K=V ...]

The service as in ``bench.overload`` (real Redis, trained model, filled cache, ``fraudscore serve``).
Each call is a ScoreBatch of ``size`` payments of the traffic day with new card ids (never seen by
the cache or by an earlier call: every item goes to the model), sent one call at a time with a
deadline of 1 s. Per size: the client's wall time per call and the server's ``latency_ms``
(the largest of the call's items: when its last item was answered, from the call's start),
median and p99 over the calls, and the answers' sources (FALLBACK = an item the model did not
score inside the budget). JSON on stdout and in ``bench/results/score-batch-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import log
from bench.overload import BUDGET_MS, SOURCE_NAMES, save_result, start_service


def batch_request(traffic, size: int, tag: str):
    from scoring_service.protos import scoring_pb2

    p = traffic.payments
    batch = scoring_pb2.ScoreBatchRequest()
    for i in range(size):
        j = (hash(tag) + i * 7919) % len(p)
        r = batch.requests.add(request_id=f"{tag}-{i}")
        t = r.transaction
        t.transaction_id, t.customer_id = f"{tag}-{i}", f"new-{tag}-{i}"
        t.terminal_id, t.amount, t.currency = str(p["terminal_id"].iat[j]), float(p["amount"].iat[j]), "EUR"
        t.timestamp.FromDatetime(p["timestamp"].iat[j].to_pydatetime())
    return batch


def pct(values: list[float]) -> dict:
    a = np.array(values)
    return {"median": round(float(np.median(a)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "max": round(float(a.max()), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--service-env", nargs="*", default=[], help="extra settings of the service, K=V")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    import grpc

    from scoring_service.protos import scoring_pb2_grpc

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    env = dict(kv.split("=", 1) for kv in args.service_env)
    traffic, envr, svc = start_service(args.workers, env)
    out: dict = {"bench": "score_batch", "stamp": stamp, "note": args.note, "budget_ms": BUDGET_MS,
                 "server": svc.describe(), "sizes": {}}
    try:
        with grpc.insecure_channel(svc.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = scoring_pb2_grpc.FraudScoringStub(ch)
            for size in [int(s) for s in args.sizes.split(",")]:
                walls, servers, sources, codes = [], [], {}, {}
                for k in range(args.calls + 2):  # the first two warm up
                    req = batch_request(traffic, size, f"sb{stamp}-{size}-{k}")
                    t0 = time.monotonic()
                    try:
                        resp = stub.ScoreBatch(req, timeout=1.0)
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                        continue
                    wall = (time.monotonic() - t0) * 1000
                    if k < 2:
                        continue
                    codes["OK"] = codes.get("OK", 0) + 1
                    walls.append(wall)
                    servers.append(max(r.latency_ms for r in resp.responses))
                    for r in resp.responses:
                        name = SOURCE_NAMES.get(r.source, "?")
                        sources[name] = sources.get(name, 0) + 1
                    time.sleep(0.05)
                out["sizes"][str(size)] = {
                    "calls": len(walls), "codes": codes, "wall_ms": pct(walls) if walls else None,
                    "server_latency_ms": pct(servers) if servers else None, "sources": sources,
                    "within_budget_share": round(sum(w <= BUDGET_MS for w in walls) / max(len(walls), 1), 3)}
                log(f"size {size}: {out['sizes'][str(size)]}")
    finally:
        svc.stop()
        envr.stop()
    save_result("score-batch", stamp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
