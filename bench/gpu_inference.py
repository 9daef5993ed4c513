"""XGBoost inference throughput (rows/s), CPU vs GPU, batch sizes 1 .. 1,000,000. Prints JSON.

    uv run python -m bench.gpu_inference --model MODEL.json [--max-batch 1000000] [--seconds 0.5]

Without --model, a stand-in booster (300 trees, depth 6, 24 features, random data) is trained.
Rows are the benchmark's handbook features when available (``--features FILE.npy``), else random
float32. Measures: CPU with 1 thread and with all cores (``inplace_predict``); where a CUDA GPU is
usable, the same booster on ``device=cuda`` with numpy input (copied per call) and, when CuPy is
installed, with input already on the GPU. Runs CPU-only where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def _gpu_available() -> tuple[bool, str]:
    import warnings

    try:
        import xgboost as xgb

        if not xgb.build_info().get("USE_CUDA"):
            return False, "this xgboost build has no CUDA (xgboost-cpu?)"
        import glob
        import shutil

        if not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*") or shutil.which("nvidia-smi")):
            return False, "no NVIDIA GPU visible (/dev/nvidia*, /proc/driver/nvidia/gpus, nvidia-smi)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = xgb.train({"device": "cuda", "max_depth": 1}, xgb.DMatrix(np.zeros((4, 1)), label=[0, 1, 0, 1]), 1)
            b.inplace_predict(np.zeros((1, 1), dtype=np.float32))
        # XGBoost only warns, then runs on the CPU, when it finds no GPU: check where it ended up.
        device = json.loads(b.save_config())["learner"]["generic_param"].get("device", "")
        if not device.startswith("cuda"):
            return False, f"xgboost fell back to device {device!r}"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable GPU"
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"


def _rate(fn, rows: int, seconds: float) -> dict:
    fn()  # warm-up (first call builds caches / copies the model to the GPU)
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 10000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"rows_per_s": rows / med, "median_call_ms": med * 1000, "calls": len(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="XGBoost model file (JSON/UBJ)")
    ap.add_argument("--features", help=".npy float32 rows to predict on (cycled up to the batch size)")
    ap.add_argument("--max-batch", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args(argv)

    import xgboost as xgb

    if args.model:
        booster = xgb.Booster(model_file=args.model)
        model_desc = args.model
    else:
        rng = np.random.default_rng(0)
        X = rng.random((20000, 24), dtype=np.float32)
        y = (X[:, 0] + 0.3 * rng.random(20000) > 0.9).astype(np.float32)
        booster = xgb.train({"objective": "binary:logistic", "max_depth": 6, "tree_method": "hist"},
                            xgb.DMatrix(X, label=y), 300)
        model_desc = "stand-in: 300 trees depth 6, 24 features, random data"
    n_feat = booster.num_features()
    if args.features:
        base = np.load(args.features).astype(np.float32)[:, :n_feat]
    else:
        base = np.random.default_rng(1).random((100_000, n_feat), dtype=np.float32)
    batches = [b for b in (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000) if b <= args.max_batch]
    gpu, why = (False, "--cpu-only") if args.cpu_only else _gpu_available()
    cupy = None
    if gpu:
        try:
            import cupy  # noqa: F401
        except ImportError:
            cupy = None
    ncpu = os.cpu_count() or 1
    out = {"xgboost": xgb.__version__, "python": platform.python_version(), "cpu_cores": ncpu, "model": model_desc,
           "num_trees": len(booster.get_dump()) if hasattr(booster, "get_dump") else None, "features": n_feat,
           "gpu": gpu, "gpu_unavailable_reason": why or None, "results": []}
    for b in batches:
        reps = -(-b // len(base))
        Xb = np.ascontiguousarray(np.tile(base, (reps, 1))[:b])
        entry = {"batch": b}
        for name, threads in (("cpu_1_thread", 1), (f"cpu_{ncpu}_threads", ncpu)):
            booster.set_param({"device": "cpu", "nthread": threads})
            entry[name] = _rate(lambda x=Xb: booster.inplace_predict(x), b, args.seconds)
        if gpu:
            booster.set_param({"device": "cuda"})
            entry["gpu_numpy_input"] = _rate(lambda x=Xb: booster.inplace_predict(x), b, args.seconds)
            if cupy is not None:
                import cupy as cp

                Xg = cp.asarray(Xb)

                def _run(x=Xg):
                    booster.inplace_predict(x)
                    cp.cuda.Stream.null.synchronize()

                entry["gpu_cupy_input"] = _rate(_run, b, args.seconds)
            booster.set_param({"device": "cpu"})
        out["results"].append(entry)
        print(f"batch {b:>9,}: " + "  ".join(f"{k} {v['rows_per_s']:,.0f}/s" for k, v in entry.items() if k != "batch"),
              file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
