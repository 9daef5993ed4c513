"""The benchmark's request files: a mix does what its name says (checked, since a wrong mix skews every figure)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.data import Traffic, score_requests
from scoring_service.protos import scoring_pb2


def _read(blob: bytes) -> list[scoring_pb2.ScoreRequest]:
    from google.protobuf.internal.decoder import _DecodeVarint32

    out, pos = [], 0
    while pos < len(blob):
        size, pos = _DecodeVarint32(blob, pos)
        out.append(scoring_pb2.ScoreRequest.FromString(blob[pos : pos + size]))
        pos += size
    return out


def _traffic() -> Traffic:
    n = 20
    p = pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(n)],
        "customer_id": [f"c{i % 7}" for i in range(n)],
        "terminal_id": [f"m{i % 5}" for i in range(n)],
        "amount": np.linspace(0.0, 190.0, n),
        "timestamp": pd.date_range("2018-08-24", periods=n, freq="min"),
    })
    return Traffic(p, np.zeros((n, 3), dtype=np.float32), p, "test")


def test_mixes_draw_cached_customers_and_unseen_ids_never_repeat_across_mixes() -> None:
    traffic, cached = _traffic(), {"c1", "c2", "c3"}
    reqs = {m: _read(score_requests(traffic, m, 400, cached, "run1")) for m in ("hits", "mixed", "unseen")}
    customers = {m: [r.transaction.customer_id for r in rs] for m, rs in reqs.items()}
    assert set(customers["hits"]) <= cached
    unseen_mixed = [c for c in customers["mixed"] if c not in cached]
    assert 0.05 < len(unseen_mixed) / 400 < 0.15
    assert not set(customers["unseen"]) & cached
    # Each mix's unseen customers are new to the whole run: the service writes them back after scoring.
    assert len(set(customers["unseen"])) == 400
    assert not set(unseen_mixed) & set(customers["unseen"])
    assert all(r.transaction.amount >= 0 and r.transaction.timestamp.seconds > 0 for r in reqs["mixed"])
