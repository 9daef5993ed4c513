"""``fraudscore retrain --as-of D`` through the real command line: the promotion gate never promotes a worse model.

On small simulated Parquet files (no Kafka, Redis or handbook file: the registry is SQLite in a tmp
FRAUDSCORE_DATA_DIR). A deliberately worse candidate is one trained on shuffled labels: the file's
training-window labels are permuted, the evaluation week's are left true. Promotion is the registry
switch of ``fraudscore model activate --direct``; the cache generation of the new version is then
built by the nightly, as after any model switch (not run here: it needs Redis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring_service.adapters.sql.db import make_engine
from scoring_service.adapters.sql.registry import Registry
from scoring_service.training.simulator import simulate
from tests.servers.common import REPO_ROOT

pytestmark = pytest.mark.integration
AS_OF = "2018-06-02"  # evaluation week 2018-05-19..25, training window 2018-05-05..11 (label delay 7 days)
TRAIN = ("2018-05-05", "2018-05-12")
EVAL_START = "2018-05-19"
ROUNDS = "30"  # boosting rounds: enough to tell a model from noise, fast on a loaded machine


def _cli(*args: str, data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUDSCORE_", "KAFKA_", "REDIS_"))}
    env.update(FRAUDSCORE_DATA_DIR=str(data_dir), FRAUDSCORE_LOG_LEVEL="WARNING", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "scoring_service.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _retrain(data: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("retrain", "--as-of", AS_OF, "--data", str(data), "--rounds", ROUNDS, *extra, data_dir=data_dir)


def _registry(data_dir: Path) -> Registry:
    return Registry(make_engine(f"sqlite:///{data_dir / 'fraudscore.db'}"))


def _models(data_dir: Path) -> dict[str, str]:
    """Every registered version's status (read in this process: a `model list` would cost an interpreter start)."""
    if not (data_dir / "fraudscore.db").exists():
        return {}
    return {r.version: r.status for r in _registry(data_dir).list()}


def _active(data_dir: Path) -> str | None:
    return next((v for v, s in _models(data_dir).items() if s == "active"), None)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good: simulated payments (every 7th card re-numbered from the evaluation week on: new cards);
    shuffled: the same with the training window's labels permuted; unlabelled; few_frauds."""
    out = tmp_path_factory.mktemp("retrain-data")
    df = simulate(n_customers=500, n_terminals=1000, start_date="2018-04-01", n_days=62, seed=5)
    day = pd.to_datetime(df["TX_DATETIME"]).dt.normalize()
    new = (df["CUSTOMER_ID"] % 7 == 0) & (day >= EVAL_START)
    df.loc[new, "CUSTOMER_ID"] += 1_000_000
    train = ((day >= TRAIN[0]) & (day < TRAIN[1])).to_numpy()
    paths = {name: out / f"{name}.parquet" for name in ("good", "shuffled", "unlabelled", "few_frauds")}
    df.to_parquet(paths["good"])
    shuffled = df.copy()
    shuffled.loc[train, "TX_FRAUD"] = np.random.default_rng(0).permutation(shuffled.loc[train, "TX_FRAUD"].to_numpy())
    shuffled.to_parquet(paths["shuffled"])
    unlabelled = df.copy()
    unlabelled["TX_FRAUD"] = np.nan  # no label arrived (read as -1)
    unlabelled.to_parquet(paths["unlabelled"])
    few = df.copy()
    frauds = np.flatnonzero(train & (few["TX_FRAUD"].to_numpy() == 1))
    few.loc[few.index[frauds[5:]], "TX_FRAUD"] = 0  # 5 frauds left in the training window
    few.to_parquet(paths["few_frauds"])
    return paths


def test_the_gate_promotes_a_better_candidate_and_refuses_a_worse_one(files: dict[str, Path], tmp_path: Path) -> None:
    # 1. no active version: the first candidate (a bad one, shuffled labels) becomes active
    first = _retrain(files["shuffled"], tmp_path, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    one = json.loads(first.stdout.strip().splitlines()[-1])
    assert one["promoted"] and one["active_before"] is None
    assert _active(tmp_path) == one["version"]

    # 2. a proper candidate against it: better, promoted through the same switch as `model activate`
    second = _retrain(files["good"], tmp_path, "--json")
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    two = json.loads(second.stdout.strip().splitlines()[-1])
    assert two["promoted"] and two["active_before"] == one["version"]
    assert two["candidate"]["metrics"]["average_precision"] > two["active"]["metrics"]["average_precision"] + 0.1
    assert two["candidate"]["new_cards"]["payments"] > 0 and two["candidate"]["new_cards"]["cards"] > 0
    assert "promoted: now the active version" in second.stdout
    models = _models(tmp_path)
    assert models[two["version"]] == "active" and models[one["version"]] == "shadow"

    # 3. a worse candidate (shuffled labels again) against the proper one: refused, registered as shadow
    third = _retrain(files["shuffled"], tmp_path, "--json")
    assert third.returncode == 3, third.stderr[-3000:] + third.stdout[-3000:]
    three = json.loads(third.stdout.strip().splitlines()[-1])
    assert not three["promoted"] and not three["gate"]["promote"]
    assert "refused by the gate" in third.stdout
    assert [r for r in three["gate"]["reasons"] if r.startswith("AP ") and r.endswith("worse")]
    assert any(line.strip().startswith("AP ") and line.endswith("worse") for line in third.stdout.splitlines())
    models = _models(tmp_path)
    assert models[three["version"]] == "shadow" and _active(tmp_path) == two["version"]

    # both reports are stored with the candidate; the gate's decision is in its `register` audit event
    registry = _registry(tmp_path)
    record = registry.get(three["version"])
    assert record.params["retrain"]["active_version"] == two["version"]
    assert record.params["retrain"]["candidate"]["per_day"] and record.params["retrain"]["active"]["per_day"]
    [event] = [e for e in registry.audit_log(100) if e.action == "register" and e.subject == three["version"]]
    gate = event.details["metrics"]["gate"]
    assert gate["promote"] is False and gate["active"] == two["version"] and gate["reasons"] == three["gate"]["reasons"]

    # 4. bad input with an active version: one line, exit 2, nothing registered, the active one untouched
    before = _models(tmp_path)
    for name, expected in (("unlabelled", "no labels in the training window 2018-05-05..2018-05-11"),
                           ("few_frauds", "too few frauds in the training window 2018-05-05..2018-05-11: 5 < 20")):
        bad = _retrain(files[name], tmp_path)
        assert bad.returncode == 2, bad.stderr[-3000:]
        line = _error_line(bad.stderr)
        assert expected in line and "nothing registered, the active version unchanged" in line, line
        assert _models(tmp_path) == before


def test_no_payments_before_d_is_one_line_and_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    done = _cli("retrain", "--as-of", "2017-01-01", "--data", str(files["good"]), data_dir=tmp_path)
    assert done.returncode == 2
    assert "no payments between" in _error_line(done.stderr)
    assert _models(tmp_path) == {}
