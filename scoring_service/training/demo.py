"""The demo model: what ``fraudscore serve`` trains on simulated payments on a first run.

Only the embedded-defaults mode uses it (see ``scoring_service.bootstrap.ensure_model``): a service
that starts with no active model trains one in about 20 s on this machine, so a newcomer's first
``make run`` answers at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from scoring_service.adapters.sql.registry import ModelRecord, Registry
from scoring_service.logging import get_logger
from scoring_service.training.registration import train_and_register
from scoring_service.training.simulator import simulate

log = get_logger(__name__)

DEMO_SIMULATION: dict[str, Any] = dict(n_customers=2000, n_terminals=4000, start_date="2018-04-01", n_days=90, seed=7)


def demo_payments() -> pd.DataFrame:
    """The simulated payments the demo model is trained on (handbook columns)."""
    return simulate(**DEMO_SIMULATION)


def ensure_model(registry: Registry, models_dir: Path) -> ModelRecord:
    """With no active model, train a demo model on simulated payments and activate it."""
    active = registry.active()
    if active is not None:
        return active
    log.info("model.demo_training", reason="no active model in the registry", **DEMO_SIMULATION)
    started = time.monotonic()
    record, _ = train_and_register(
        registry, models_dir, payments=demo_payments(), activate=True,
        description="demo model trained on simulated payments (first run)",
    )
    log.info("model.demo_ready", model_version=record.version, seconds=round(time.monotonic() - started, 1))
    return record
