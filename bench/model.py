"""The XGBoost model both servers serve.

Preferred: the project's own ``fraudscore train --data HANDBOOK --activate`` output (the
registry's active artifact). Until that exists, or with ``--throwaway-model``: a stand-in
trained here on the same features (300 trees, depth 6, ``scoring_service.core.features``), saved as
XGBoost JSON. Both are plain XGBoost boosters with ``binary:logistic``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import CACHE_DIR, log


def train_throwaway(traffic_all, out: Path | None = None, n_trees: int = 300, depth: int = 6) -> Path:
    """A 300-tree depth-6 booster on the handbook's training week (features of the whole file)."""
    import pandas as pd
    import xgboost as xgb

    from scoring_service.core import features as F

    out = out or CACHE_DIR / f"throwaway-{n_trees}x{depth}.model.json"
    if out.is_file():
        return out
    t0 = time.monotonic()
    p = traffic_all
    lo = p["timestamp"].searchsorted(pd.Timestamp("2018-06-15"))
    hi = p["timestamp"].searchsorted(pd.Timestamp("2018-08-01"))
    window = p.iloc[lo:hi].reset_index(drop=True)
    X = F.payments_features(window).to_numpy(dtype=np.float32)
    keep = (window["timestamp"] >= pd.Timestamp("2018-07-25")).to_numpy()
    y = window["is_fraud"].to_numpy()[keep]
    d = xgb.DMatrix(X[keep], label=y, feature_names=list(F.FEATURE_NAMES))
    booster = xgb.train({"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "tree_method": "hist",
                         "max_bin": 1024, "nthread": 2, "eval_metric": "auc"}, d, num_boost_round=n_trees)
    out.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out))
    log(f"throwaway model: {n_trees} trees depth {depth} on {keep.sum()} rows in {time.monotonic() - t0:.1f}s -> {out}")
    return out
