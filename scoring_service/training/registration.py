"""Train a model and register it: the use case behind ``fraudscore train``, the demo model and the tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from scoring_service.adapters.sql.registry import ModelRecord, Registry


def train_and_register(
    registry: Registry,
    models_dir: Path,
    *,
    framework: str = "xgboost",
    activate: bool = True,
    description: str = "",
    data: Path | None = None,
    payments: pd.DataFrame | None = None,
) -> tuple[ModelRecord, Any]:
    """Train on the handbook protocol (``data``) or on a payments frame, and register the result."""
    from scoring_service.adapters.model.gbdt import sha256_file
    from scoring_service.training import train as training

    version = registry.next_version("xgb" if framework == "xgboost" else "lgbm")
    out_dir = models_dir / version
    if data is not None:
        result = training.train_handbook(data, out_dir, framework=framework)
    elif payments is not None:
        if "timestamp" not in payments.columns:  # handbook / simulator columns
            from scoring_service.core.features import normalise_handbook

            payments = normalise_handbook(payments)
        result = training.train_on_payments(payments, out_dir, framework=framework)
    else:
        raise ValueError("train_and_register needs data or payments")
    record = registry.register(
        version=version,
        framework=result.framework,
        artifact_path=str(Path(result.artifact_path).resolve()),
        sha256=sha256_file(result.artifact_path),
        feature_names=result.feature_names,
        thresholds=result.thresholds,
        # JSON holds no infinity (PostgreSQL refuses it): a rule that never fires is stored by its absence.
        policy={k: v for k, v in result.policy.items() if math.isfinite(v)},
        metrics=result.metrics,
        params={**result.params, "train_window": list(result.train_window), "test_window": list(result.test_window),
                "drift_profile": result.extra.get("drift_profile")},  # core/drift.py: the PSI reference
        description=description,
        activate=activate,
    )
    return record, result
