"""Model lifecycle use cases shared by the CLI, the tests and the benchmarks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from scoring_service.config import Settings
from scoring_service.adapters.sql.db import make_engine, upgrade_schema
from scoring_service.logging import get_logger
from scoring_service.adapters.sql.registry import ModelRecord, Registry

log = get_logger(__name__)

DEMO_SIMULATION = dict(n_customers=2000, n_terminals=4000, start_date="2018-04-01", n_days=90, seed=7)


def open_registry(settings: Settings) -> Registry:
    """The registry on the configured database, migrated to the newest schema."""
    url = settings.resolved_database_url()
    upgrade_schema(url)
    return Registry(make_engine(url))


def train_and_register(
    settings: Settings,
    registry: Registry,
    *,
    framework: str = "xgboost",
    activate: bool = True,
    description: str = "",
    data: Path | None = None,
    payments: pd.DataFrame | None = None,
) -> tuple[ModelRecord, Any]:
    """Train on the handbook protocol (``data``) or on a payments frame, and register the result."""
    from scoring_service.training.train import train as training
    from scoring_service.adapters.model.gbdt import sha256_file

    version = registry.next_version("xgb" if framework == "xgboost" else "lgbm")
    out_dir = settings.models_dir / version
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
        policy=result.policy,
        metrics=result.metrics,
        params={**result.params, "train_window": list(result.train_window), "test_window": list(result.test_window)},
        description=description,
        activate=activate,
    )
    return record, result


def ensure_model(settings: Settings) -> ModelRecord:
    """First run: with no active model, train a demo model on simulated payments and activate it."""
    registry = open_registry(settings)
    active = registry.active()
    if active is not None:
        return active
    from scoring_service.training.simulator import simulate

    log.info("model.demo_training", reason="no active model in the registry", **DEMO_SIMULATION)
    started = time.monotonic()
    record, _ = train_and_register(
        settings, registry, payments=simulate(**DEMO_SIMULATION), activate=True,
        description="demo model trained on simulated payments (first run)",
    )
    log.info("model.demo_ready", model_version=record.version, seconds=round(time.monotonic() - started, 1))
    return record
