"""Benchmark traffic: handbook payments -> pre-serialised gRPC requests (varint-delimited files).

Three Score() mixes (``hits``, ``mixed`` = 90 % hits / 10 % unseen, ``unseen``) and the matching
ModelInfer requests for the MLServer reference (the same payments' features, float32, from
``scoring_service.core.features``). Unseen customers get ids ``unseen-<run>-<n>``, never repeated within
a run: our service writes an unseen customer back to the cache after scoring it, so a repeated id
would become a hit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import CACHE_DIR, HANDBOOK, log

TRAFFIC_DAY = "2018-08-24"  # traffic: payments of this day (real ids, amounts, times)
CACHE_AS_OF = "2018-08-23 23:59:59"  # the cache is filled with entity states as of this instant


@dataclass
class Traffic:
    payments: pd.DataFrame  # normalised payments of the traffic window
    features: np.ndarray  # (n, F) float32, the same rows' features (batch computation)
    all_payments: pd.DataFrame  # everything (training, cache fill)
    source: str


def load_traffic(path: Path | None = None) -> Traffic:
    from scoring_service.adapters.files.payments_file import read_payments_file
    from scoring_service.core import features as F

    path = path or HANDBOOK
    if path.is_file():
        payments = read_payments_file(path)
        source = str(path)
    else:  # no handbook file: the project's simulator, same columns
        from scoring_service.training.simulator import simulate

        log(f"no {path}: simulating payments")
        payments = F.normalise_handbook(simulate(n_customers=5000, n_terminals=10000, start_date="2018-04-01",
                                                 n_days=153, seed=11))
        source = "scoring_service.training.simulator"
    day0 = pd.Timestamp(TRAFFIC_DAY)
    lo = payments["timestamp"].searchsorted(day0 - pd.Timedelta(days=40))
    window = payments.iloc[lo:].reset_index(drop=True)  # enough history for the 30 (+7) day windows
    X = F.payments_features(window).to_numpy(dtype=np.float32)
    sel = ((window["timestamp"] >= day0) & (window["timestamp"] < day0 + pd.Timedelta(days=1))).to_numpy()
    return Traffic(window[sel].reset_index(drop=True), X[sel], payments, source)


def _delimited(messages) -> bytes:
    from google.protobuf.internal.encoder import _VarintBytes

    out = bytearray()
    for m in messages:
        b = m.SerializeToString()
        out += _VarintBytes(len(b))
        out += b
    return bytes(out)


def score_requests(traffic: Traffic, mix: str, n: int, cached_customers: set[str] | None, run_id: str,
                   seed: int = 1) -> bytes:
    """``n`` ScoreRequest messages, varint-delimited. ``mix``: hits, mixed (90/10) or unseen."""
    from scoring_service.protos import scoring_pb2

    p = traffic.payments
    if cached_customers is not None:
        p = p[p["customer_id"].isin(cached_customers)].reset_index(drop=True)
    if len(p) == 0:
        raise RuntimeError("no traffic rows whose customer is cached")
    rng = np.random.default_rng(seed)
    unseen = np.zeros(n, dtype=bool) if mix == "hits" else (
        np.ones(n, dtype=bool) if mix == "unseen" else rng.random(n) < 0.10)
    cust = p["customer_id"].to_numpy()
    term = p["terminal_id"].to_numpy()
    amt = p["amount"].to_numpy()
    ts_ns = p["timestamp"].to_numpy().astype("datetime64[ns]").view("int64")
    tx = p["transaction_id"].to_numpy()
    msgs = []
    for i in range(n):
        j = i % len(p)
        req = scoring_pb2.ScoreRequest(request_id=f"{run_id}-{mix}-{i}")
        t = req.transaction
        t.transaction_id = f"{tx[j]}-{i}"
        t.customer_id = f"unseen-{run_id}-{mix}-{i}" if unseen[i] else cust[j]  # unique across mixes too
        t.terminal_id = term[j]
        t.amount = float(amt[j])
        t.currency = "EUR"
        t.timestamp.seconds = int(ts_ns[j] // 1_000_000_000)
        t.timestamp.nanos = int(ts_ns[j] % 1_000_000_000)
        msgs.append(req)
    return _delimited(msgs)


def infer_requests(traffic: Traffic, n: int, pb2, output: str = "predict", raw: bool = True) -> bytes:
    """``n`` Open Inference Protocol ModelInferRequest messages, one row of float32 features each."""
    X = traffic.features
    msgs = []
    for i in range(n):
        row = X[i % len(X)]
        req = pb2.ModelInferRequest(model_name="fraud-xgb", id=str(i))
        inp = req.inputs.add(name="input-0", datatype="FP32", shape=[1, X.shape[1]])
        if raw:
            req.raw_input_contents.append(row.astype("<f4").tobytes())
        else:
            inp.contents.fp32_contents.extend(row.tolist())
        req.outputs.add(name=output)
        msgs.append(req)
    return _delimited(msgs)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


__all__ = ["CACHE_AS_OF", "TRAFFIC_DAY", "Traffic", "infer_requests", "load_traffic", "score_requests", "write", "CACHE_DIR"]
