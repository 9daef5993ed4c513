"""Quality on the real handbook file, with the handbook's protocol (train 07-25..07-31, delay 7
days, test 08-08..08-14): the model must beat the handbook's XGBoost row on all three metrics.

The file is located through FRAUDSCORE_HANDBOOK (default ../shared/data/handbook/...). When it
is absent the test trains on simulated payments instead and says so (the figures of the
handbook then do not apply, only sanity bounds are checked).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from scoring_service.adapters.files.payments_file import read_payments_file  # noqa: E402
from scoring_service.adapters.model.gbdt import GbdtModel, sha256_file  # noqa: E402
from scoring_service.core import features as F  # noqa: E402
from scoring_service.training.train import train_handbook, train_on_payments  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HANDBOOK = REPO.parent / "shared" / "data" / "handbook" / "transactions-2018-04-01_2018-08-31.parquet"
HANDBOOK_XGBOOST = {"auc_roc": 0.862, "average_precision": 0.639, "card_precision_at_100": 0.273}


def handbook_path() -> Path:
    return Path(os.environ.get("FRAUDSCORE_HANDBOOK", str(DEFAULT_HANDBOOK)))


def test_beats_handbook_xgboost(tmp_path):
    path = handbook_path()
    if not path.is_file():
        msg = f"handbook file {path} not found (set FRAUDSCORE_HANDBOOK): training on SIMULATED payments instead"
        warnings.warn(msg, stacklevel=1)
        print(msg)
        from scoring_service.training.simulator import simulate

        payments = F.normalise_handbook(simulate(3000, 6000, "2018-04-01", 60, seed=0))
        res = train_on_payments(payments, tmp_path)
        assert res.metrics["auc_roc"] > 0.8 and res.metrics["average_precision"] > 0.5
        return
    res = train_handbook(path, tmp_path)
    print(json.dumps(res.metrics))
    assert res.extra["n_train"] == 67240 and res.extra["n_test"] == 58264
    for k, ref in HANDBOOK_XGBOOST.items():
        assert res.metrics[k] > ref, f"{k} = {res.metrics[k]:.4f} does not beat the handbook's {ref}"
    # the artefact loads and reproduces the scores
    assert res.artifact_path.is_file()
    sha = sha256_file(res.artifact_path)
    m = GbdtModel.load(res.artifact_path, res.framework, res.feature_names, expected_sha256=sha, device="cpu")
    # a typical customer (57 payments, usual amount 58) and a terminal without known fraud
    cs = {"nb_tx_1d": 2.0, "sum_amount_1d": 128.12, "nb_tx_7d": 15.0, "sum_amount_7d": 860.34, "nb_tx_30d": 57.0,
          "sum_amount_30d": 3331.85, "sumsq_amount_30d": 235166.14, "max_amount_30d": 102.3, "avg_amount_30d": 58.45,
          "nb_fraud_known_30d": 0.0, "last_ts": 1533642539.0}
    term = {f"{k}_{w}d_delayed": v for w in (1, 7, 14, 30) for k, v in (("nb_tx", float(w)), ("nb_fraud", 0.0))}
    term.update(first_fraud_ts_delayed=-1.0, last_fraud_ts_delayed=-1.0, nb_tx_since_first_fraud_delayed=0.0,
                nb_tx_after_last_fraud_delayed=0.0, last_ts=1533642539.0)
    ts = 1533722400.0  # 2018-08-08 10:00 UTC
    X = F.online_features_many([(55.0, ts, cs, term), (500.0, ts, cs, term)])
    p = m.predict(X)  # an amount over 220 is always fraud here
    assert p[1] > 0.9 > p[0]
    # an unseen card and terminal (the cold-start rows in training teach the model this case)
    cold = m.predict(F.online_features_many([(30.0, ts, None, None), (500.0, ts, None, None)]))
    assert cold[1] > 0.9 and cold[0] < 0.1
    # thresholds and policy are data-derived and sensible
    assert 0 < res.thresholds["review"] <= res.thresholds["decline"] <= 1
    assert 150 < res.policy["high_amount"] <= 260
    assert res.policy["high_amount_fraud_rate"] >= 0.9  # the rule's own definition, measured on the training week
    assert 1.0 < res.policy["amount_ratio_review"] <= res.policy["amount_ratio_decline"]
    assert json.loads((tmp_path / "train_result.json").read_text())["metrics"] == pytest.approx(res.metrics)


def test_protocol_reproduces_handbook_xgboost():
    """Our protocol code + the handbook's 15 features + 1.x XGBoost defaults = the published row."""
    path = handbook_path()
    if not path.is_file():
        pytest.skip(f"handbook file {path} not found (set FRAUDSCORE_HANDBOOK): the published figures need it")
    from scoring_service.training.evaluation import handbook_xgboost_baseline

    payments = read_payments_file(path)
    feats = F.payments_features(payments)
    m = handbook_xgboost_baseline(payments, feats)
    assert round(m["auc_roc"], 3) == HANDBOOK_XGBOOST["auc_roc"]
    assert round(m["average_precision"], 3) == HANDBOOK_XGBOOST["average_precision"]
    assert round(m["card_precision_at_100"], 3) == HANDBOOK_XGBOOST["card_precision_at_100"]
