"""forest.Forest: the NumPy path attribution equals XGBoost's approx_contribs, and GbdtModel uses it."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scoring_service.adapters.model.forest import Forest
from scoring_service.adapters.model.gbdt import GbdtModel
from scoring_service.core import features as F
from scoring_service.training.simulator import simulate


@pytest.fixture(scope="module")
def data():
    p = F.normalise_handbook(simulate(600, 1200, "2018-04-01", 30, seed=11))
    X = F.payments_features(p).to_numpy(np.float32).copy()
    y = (p["is_fraud"].to_numpy() == 1).astype(np.float32)
    rng = np.random.default_rng(0)
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values, so that default directions are learnt and used
    return X, y


def _train(X, y, **params):
    p = {"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": 0, **params}
    return xgb.train(p, xgb.DMatrix(X, label=y), 40)


def _reference(booster, X):
    return booster.predict(xgb.DMatrix(X, nthread=1), pred_contribs=True, approx_contribs=True, validate_features=False)


@pytest.mark.parametrize("params", [{}, {"max_depth": 6, "min_child_weight": 0.1}, {"max_depth": 2, "base_score": 0.3},
                                    {"tree_method": "exact"}])
def test_contributions_equal_xgboost(data, params):
    X, y = data
    booster = _train(X, y, **params)
    forest = Forest.from_xgboost(booster)
    assert forest is not None and forest.n_trees == 40 and forest.n_features == X.shape[1]
    for rows in (X[:1], X[:7], X[:500]):
        got = forest.contributions(rows)
        ref = _reference(booster, rows)
        assert got.shape == ref.shape == (len(rows), X.shape[1] + 1)
        np.testing.assert_allclose(got, ref, atol=2e-5)
        # the margin, hence the probability, is the same as the booster's prediction
        np.testing.assert_allclose(1 / (1 + np.exp(-got.sum(axis=1))), booster.predict(xgb.DMatrix(rows)), atol=1e-6)
    assert forest.contributions(X[:0]).shape == (0, X.shape[1] + 1)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (5, 26), elements=st.one_of(st.floats(-1e6, 1e6, width=32), st.just(np.nan))))
def test_contributions_equal_xgboost_on_arbitrary_rows(trained, rows):
    booster, forest = trained
    np.testing.assert_allclose(forest.contributions(rows), _reference(booster, rows), atol=2e-5)


@pytest.fixture(scope="module")
def trained(data):
    X, y = data
    assert X.shape[1] == 26
    booster = _train(X, y)
    return booster, Forest.from_xgboost(booster)


def test_unsupported_models_are_left_to_xgboost(data):
    X, y = data
    assert Forest.from_xgboost(_train(X, y, objective="reg:squarederror")) is None
    assert Forest.from_xgboost(_train(X, y, booster="dart")) is None
    yy = (np.arange(len(y)) % 3).astype(np.float32)
    assert Forest.from_xgboost(_train(X, yy, objective="multi:softprob", num_class=3)) is None


def test_model_uses_forest_for_small_batches_only(data, tmp_path):
    X, y = data
    booster = _train(X, y)
    path = tmp_path / "m.ubj"
    booster.save_model(str(path))
    m = GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, device="cpu", forest_max_rows=16)
    assert m.forest_max_rows == 16
    calls = []
    real = m._forest.contributions
    m._forest.contributions = lambda rows: calls.append(len(rows)) or real(rows)
    probs, reasons = m.predict_and_explain(X[:10], exact_from=float("inf"))
    probs_big, _ = m.predict_and_explain(X[:40], exact_from=float("inf"))
    assert calls == [10]  # 40 rows went to XGBoost
    np.testing.assert_allclose(probs, booster.predict(xgb.DMatrix(X[:10])), atol=1e-6)
    np.testing.assert_allclose(probs_big[:10], probs, atol=1e-6)
    off = GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, device="cpu", forest_max_rows=0)
    probs_off, reasons_off = off.predict_and_explain(X[:10], exact_from=float("inf"))
    assert off._forest is None
    np.testing.assert_allclose(probs_off, probs, atol=1e-6)
    # same top reason codes (ties aside, the attributions agree to 2e-5)
    assert [r[0][0] for r in reasons_off] == [r[0][0] for r in reasons]


def test_a_forest_of_single_leaves_gives_the_bias_only(data):
    """A model trained on too little to split (every tree one leaf) used to fail with
    "need at least one array to concatenate": every unseen payment answered INTERNAL."""
    X, y = data
    booster = _train(X, y, min_child_weight=1e9)  # no child may be that heavy: no tree splits
    forest = Forest.from_xgboost(booster)
    assert forest is not None
    np.testing.assert_allclose(forest.contributions(X[:5]), _reference(booster, X[:5]), atol=1e-4)
