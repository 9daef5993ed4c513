"""Path attribution for small batches without XGBoost's per-call overhead.

An XGBoost call on a few rows costs ~300 µs here whatever it computes: building the ``DMatrix``,
the JSON configuration, the output copy. The online micro-batcher's batches are 1 to 64 rows,
so most of that is overhead. ``Forest`` holds the same trees as flat NumPy arrays and walks all
of them for all rows at once, one tree level per step, computing what XGBoost's
``pred_contribs=True, approx_contribs=True`` computes (Saabas path attribution: at each split,
the change in the node's cover-weighted mean value goes to the split's feature; the bias is the
sum of the roots' means plus the base margin). Their sum is the margin, so the probability is
its sigmoid. It agrees with XGBoost to ~1e-5 in log-odds (float64 sums here, float32 there),
which ``tests/unit/test_forest.py`` checks on trained models, missing values included.

Only what the service trains is supported: a ``gbtree`` booster, ``binary:logistic``, one
target, numerical splits. ``Forest.from_xgboost`` returns ``None`` for anything else, and the
caller keeps using XGBoost. Exact TreeSHAP (the reasons of flagged payments, the nightly job)
always runs in XGBoost.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


class Forest:
    def __init__(self, n_features: int, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray,
                 right: np.ndarray, default_left: np.ndarray, mean: np.ndarray, roots: np.ndarray, depth: int,
                 base_margin: float) -> None:
        self.n_features = n_features
        self._feature = feature  # split feature per node; leaves: n_features (a dummy column)
        self._threshold = threshold  # float32, as XGBoost compares
        self._left = left  # global node index; leaves point at themselves
        self._right = right
        self._default_left = default_left  # where a missing value goes
        self._mean = mean  # cover-weighted mean of the leaves under each node (float64)
        self._roots = roots
        self.depth = depth
        self._bias = float(mean[roots].sum() + base_margin)

    @property
    def n_trees(self) -> int:
        return len(self._roots)

    @classmethod
    def from_xgboost(cls, booster: Any) -> Forest | None:
        """The booster's trees, or None when the model is of a kind this evaluator does not cover."""
        model = json.loads(booster.save_raw("json"))
        learner = model["learner"]
        gb = learner["gradient_booster"]
        param = learner["learner_model_param"]
        if (gb.get("name") != "gbtree" or learner["objective"]["name"] != "binary:logistic"
                or int(param.get("num_target", "1")) != 1 or int(param.get("num_class", "0")) > 1):
            return None
        trees = gb["model"]["trees"]
        if not trees:
            return None
        base = float(str(param["base_score"]).strip("[]"))
        if not 0.0 < base < 1.0:
            return None
        n_features = int(param["num_feature"])
        feature, threshold, left, right, default_left, mean, roots = [], [], [], [], [], [], []
        offset = depth = 0
        for t in trees:
            if any(int(s) != 0 for s in t.get("split_type", [])) or t.get("categories"):
                return None  # categorical splits
            lc = np.asarray(t["left_children"], dtype=np.int64)
            rc = np.asarray(t["right_children"], dtype=np.int64)
            cond = np.asarray(t["split_conditions"], dtype=np.float32)
            hess = np.asarray(t["sum_hessian"], dtype=np.float64)
            n = len(lc)
            leaf = lc == -1
            m = np.zeros(n)
            node_depth = np.zeros(n, dtype=np.int64)
            # Parents come before children in XGBoost's arrays; fill the means bottom-up.
            order = [0]
            for i in order:
                if not leaf[i]:
                    node_depth[lc[i]] = node_depth[rc[i]] = node_depth[i] + 1
                    order.extend((int(lc[i]), int(rc[i])))
            for i in reversed(order):
                if leaf[i]:
                    m[i] = cond[i]  # a leaf's split_condition holds its value
                else:
                    h = hess[i] if hess[i] > 0 else hess[lc[i]] + hess[rc[i]]
                    m[i] = (m[lc[i]] * hess[lc[i]] + m[rc[i]] * hess[rc[i]]) / h if h > 0 else 0.0
            depth = max(depth, int(node_depth.max()))
            own = np.arange(n)
            feature.append(np.where(leaf, n_features, np.asarray(t["split_indices"], dtype=np.int64)))
            threshold.append(np.where(leaf, np.float32(0), cond))
            left.append(np.where(leaf, own, lc) + offset)
            right.append(np.where(leaf, own, rc) + offset)
            default_left.append(np.asarray(t["default_left"], dtype=bool))
            mean.append(m)
            roots.append(offset)
            offset += n
        features = np.concatenate(feature)
        if int(features.max()) > n_features:
            return None
        return cls(n_features, features, np.concatenate(threshold).astype(np.float32),
                   np.concatenate(left), np.concatenate(right), np.concatenate(default_left), np.concatenate(mean),
                   np.asarray(roots, dtype=np.int64), depth, math.log(base / (1.0 - base)))

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, F + 1) path attributions in log-odds; the last column is the bias."""
        X = np.asarray(X, dtype=np.float32)
        n, width = len(X), self.n_features + 1
        if n == 0:
            return np.zeros((0, width))
        trees = self.n_trees
        node = np.tile(self._roots, n)  # (row, tree) flattened
        row_base = np.repeat(np.arange(n, dtype=np.int64) * width, trees)
        values = np.zeros((n, width), dtype=np.float32)
        values[:, : self.n_features] = X
        flat = values.ravel()
        keys, deltas = [], []
        for _ in range(self.depth):
            key = row_base + self._feature[node]
            x = flat[key]
            go_left = x < self._threshold[node]
            missing = np.isnan(x)
            if missing.any():
                go_left = np.where(missing, self._default_left[node], go_left)
            nxt = np.where(go_left, self._left[node], self._right[node])
            keys.append(key)
            deltas.append(self._mean[nxt] - self._mean[node])
            node = nxt
        if not keys:  # every tree is a single leaf (a model trained on too little to split): only the bias
            out: np.ndarray = np.zeros((n, width))
        else:
            out = np.bincount(np.concatenate(keys), weights=np.concatenate(deltas), minlength=n * width).reshape(n, width)
        out[:, self.n_features] += self._bias
        return out


__all__ = ["Forest"]
