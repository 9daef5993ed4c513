"""Loading and running a trained GBDT model (XGBoost UBJSON/JSON or LightGBM text).

Skew check: :meth:`GbdtModel.load` refuses a model whose feature names (the registry record's,
and the booster's own where it carries them) are not ``core.features.FEATURE_NAMES`` exactly, in
order: a model trained on other features, or on the same ones in another order, would score
every payment on the wrong columns without any error.

Device: large batches (nightly) may run on CUDA when XGBoost can use a GPU; batches smaller than
``GPU_MIN_ROWS`` always run on the CPU booster (a GPU launch costs ~1 ms; crossover ~1,000 rows).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scoring_service.adapters.model.forest import Forest
from scoring_service.core.features import FEATURE_NAMES

GPU_MIN_ROWS = 1000
# Path attribution for batches up to this many rows runs in ``forest.Forest`` (NumPy), not XGBoost:
# 46 µs against 317 µs for one row, 231 against 704 for 16, 879 against 1,544 for 64 (this machine).
FOREST_MAX_ROWS = 128


class ModelError(Exception):
    """The model cannot be loaded or used (missing file, checksum mismatch, other features, bad input)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DEVICE_CACHE: dict[str, str] = {}


def _cuda_available() -> bool:
    """True when XGBoost is built with CUDA and a GPU is visible (cheap checks, never raises)."""
    if "cuda" in _DEVICE_CACHE:
        return _DEVICE_CACHE["cuda"] == "1"
    ok = False
    try:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            raise RuntimeError("no visible device")
        import xgboost as xgb

        if not xgb.build_info().get("USE_CUDA", False):
            raise RuntimeError("xgboost without CUDA")
        has_dev = any(Path("/dev").glob("nvidia[0-9]*"))
        if not has_dev and shutil.which("nvidia-smi"):
            r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=5, text=True)
            has_dev = r.returncode == 0 and "GPU" in r.stdout
        if has_dev:
            # a tiny training run on the device proves it works (fails cleanly otherwise)
            d = xgb.DMatrix(np.array([[0.0], [1.0]]), label=np.array([0.0, 1.0]))
            xgb.train({"device": "cuda", "tree_method": "hist", "verbosity": 0}, d, 1)
            ok = True
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        ok = False
    _DEVICE_CACHE["cuda"] = "1" if ok else "0"
    return ok


def choose_device(requested: str = "auto") -> str:
    """"cpu" or "cuda"; "cuda" only when XGBoost can use a GPU ("auto" and "cuda" both check)."""
    req = (requested or "auto").lower()
    if req == "cpu":
        return "cpu"
    if req not in ("auto", "cuda", "gpu"):
        raise ModelError(f"unknown device {requested!r} (auto | cpu | cuda)")
    return "cuda" if _cuda_available() else "cpu"


def _check_names(path: Path, what: str, names: Sequence[str], expected: Sequence[str]) -> None:
    """ModelError naming the first position where ``names`` and ``expected`` differ, if any."""
    names, expected = list(names), list(expected)
    if names == expected:
        return
    i = next((k for k, (a, b) in enumerate(zip(names, expected, strict=False)) if a != b), min(len(names), len(expected)))
    got = repr(names[i]) if i < len(names) else "nothing"
    want = repr(expected[i]) if i < len(expected) else "nothing"
    raise ModelError(
        f"model {path} was trained on other features than this service computes: {what} have {got} at position {i} "
        f"where {want} is expected ({len(names)} names, {len(expected)} expected); refusing to load it (training/serving skew)"
    )


def _reason_code(feature: str, contribution: float) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", feature).strip("_").upper()
    return f"{base}_{'HIGH' if contribution >= 0 else 'LOW'}"


class GbdtModel:
    framework: str
    feature_names: list[str]
    device: str

    def __init__(self, framework: str, feature_names: Sequence[str], booster: Any, device: str = "cpu", nthread: int = 1,
                 gpu_booster: Any = None, forest_max_rows: int = FOREST_MAX_ROWS) -> None:
        self.framework = framework
        self.feature_names = list(feature_names)
        self.device = device
        self.nthread = nthread
        self._booster = booster  # CPU booster
        self._gpu_booster = gpu_booster  # XGBoost copy on cuda for big batches
        self._codes_pos = [_reason_code(f, 1.0) for f in self.feature_names]
        self._codes_neg = [_reason_code(f, -1.0) for f in self.feature_names]
        self._forest: Forest | None = None
        self.forest_max_rows = 0
        if framework == "xgboost" and forest_max_rows > 0:
            self._forest = Forest.from_xgboost(booster)
            if self._forest is not None and self._forest.n_features == len(self.feature_names):
                self.forest_max_rows = forest_max_rows
            else:
                self._forest = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], framework: str, feature_names: Sequence[str], expected_sha256: str | None = None,
             device: str = "auto", nthread: int = 1, forest_max_rows: int = FOREST_MAX_ROWS, *,
             expected_feature_names: Sequence[str] | None = FEATURE_NAMES) -> GbdtModel:
        """Load a model file and check it: its sha256 (when given), its number of features, and
        its feature names (``feature_names``, from the registry record, and the booster's own when
        it carries any) against ``expected_feature_names``, exactly and in order. The default is
        the service's ``FEATURE_NAMES``; ``None`` skips the names check (toy models in tests).
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        if expected_sha256 is not None:
            actual = sha256_file(path)
            if actual.lower() != expected_sha256.lower():
                raise ModelError(f"model file {path} has sha256 {actual}, expected {expected_sha256}: refusing to load it")
        dev = choose_device(device)
        gpu: Any = None
        booster: Any
        try:
            if framework == "xgboost":
                import xgboost as xgb

                booster = xgb.Booster(params={"nthread": nthread})
                booster.load_model(str(path))
                booster.set_param({"device": "cpu", "nthread": nthread})
                if dev == "cuda":
                    gpu = xgb.Booster(params={"nthread": nthread})
                    gpu.load_model(str(path))
                    gpu.set_param({"device": "cuda"})
                n_feat = booster.num_features()
                own_names = booster.feature_names  # None unless the training data had names
            elif framework == "lightgbm":
                import lightgbm as lgb

                booster = lgb.Booster(model_file=str(path))
                dev = "cpu"  # LightGBM prediction is CPU only
                n_feat = booster.num_feature()
                own_names = booster.feature_name()
                if own_names == [f"Column_{i}" for i in range(n_feat)]:
                    own_names = None  # LightGBM's names for a training matrix without names
            else:
                raise ModelError(f"unknown framework {framework!r} (xgboost | lightgbm)")
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load {framework} model {path}: {e}") from e
        if n_feat != len(feature_names):
            raise ModelError(f"model {path} expects {n_feat} features, {len(feature_names)} feature names given")
        if expected_feature_names is not None:
            _check_names(path, "the feature names given (the registry record's)", feature_names, expected_feature_names)
        if own_names is not None:
            _check_names(path, f"the {framework} booster's own feature names", own_names, feature_names)
        return cls(framework, feature_names, booster, dev, nthread, gpu, forest_max_rows)

    def _check(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ModelError(f"expected an (n, {len(self.feature_names)}) feature matrix, got shape {X.shape}")
        return X

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._check(X)
        if len(X) == 0:
            return np.empty(0, dtype=np.float64)
        if self.framework == "xgboost":
            b = self._gpu_booster if (self._gpu_booster is not None and len(X) >= GPU_MIN_ROWS) else self._booster
            return np.asarray(b.inplace_predict(X, validate_features=False), dtype=np.float64)
        return np.asarray(self._booster.predict(X, num_threads=self.nthread), dtype=np.float64)

    def _contribs_with_bias(self, X: np.ndarray, approx: bool = False) -> np.ndarray:
        """(n, F + 1) contributions in log-odds; the last column is the bias.

        ``approx`` (XGBoost only): path attribution (Saabas) instead of TreeSHAP, about 10x
        cheaper; it sums to the same margin, and picks the same top reason ~80% of the time."""
        if approx and self._forest is not None and len(X) <= self.forest_max_rows:
            return self._forest.contributions(X)
        if self.framework == "xgboost":
            import xgboost as xgb

            b = self._gpu_booster if (self._gpu_booster is not None and len(X) >= GPU_MIN_ROWS) else self._booster
            c = b.predict(xgb.DMatrix(X, nthread=self.nthread), pred_contribs=True, approx_contribs=approx,
                          validate_features=False)
        else:
            c = self._booster.predict(X, pred_contrib=True, num_threads=self.nthread)
        return np.asarray(c, dtype=np.float64)

    def explain(self, X: np.ndarray, top_k: int = 3) -> list[list[tuple[str, str, float]]]:
        X = self._check(X)
        if len(X) == 0:
            return []
        return self._reasons(self._contribs_with_bias(X)[:, : len(self.feature_names)], top_k)

    def _reasons(self, c: np.ndarray, top_k: int) -> list[list[tuple[str, str, float]]]:
        k = max(0, min(top_k, c.shape[1]))
        idx = np.argsort(-np.abs(c), axis=1, kind="stable")[:, :k]
        out: list[list[tuple[str, str, float]]] = []
        for i in range(len(c)):
            row: list[tuple[str, str, float]] = []
            for j in idx[i]:
                v = float(c[i, j])
                row.append((self._codes_pos[j] if v >= 0 else self._codes_neg[j], self.feature_names[j], v))
            out.append(row)
        return out

    def predict_and_explain(
        self, X: Any, top_k: int = 3, exact_from: float | None = None
    ) -> tuple[np.ndarray, list[list[tuple[str, str, float]]]]:
        """Probabilities and reasons.

        ``exact_from=None``: exact TreeSHAP for every row, in ONE model pass (for a logistic
        model the contributions plus the bias sum to the margin, so the probability is their
        sigmoid). ``exact_from=p`` (XGBoost): cheap path attribution for every row, and exact
        TreeSHAP only for the rows whose probability reaches ``p`` (the flagged payments, whose
        reasons a person reads); ``exact_from=inf`` never uses TreeSHAP.
        """
        X = self._check(X)
        if len(X) == 0:
            return np.empty(0, dtype=np.float64), []
        if exact_from is None or self.framework != "xgboost":
            c = self._contribs_with_bias(X)
        else:
            c = self._contribs_with_bias(X, approx=True)
            flagged = np.flatnonzero(1.0 / (1.0 + np.exp(-c.sum(axis=1))) >= exact_from)
            if len(flagged):
                c[flagged] = self._contribs_with_bias(X[flagged])
        probs = 1.0 / (1.0 + np.exp(-c.sum(axis=1)))
        return probs, self._reasons(c[:, : len(self.feature_names)], top_k)
