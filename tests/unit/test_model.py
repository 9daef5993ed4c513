"""GbdtModel: loading with checks, predictions equal to the booster's, explanations."""

from __future__ import annotations

import numpy as np
import pytest

from scoring_service.adapters.model.gbdt import GbdtModel, ModelError, choose_device, sha256_file
from scoring_service.core import features as F
from scoring_service.training.simulator import simulate


@pytest.fixture(scope="module")
def data():
    p = F.normalise_handbook(simulate(600, 1200, "2018-04-01", 30, seed=5, card_testing_per_day=0.0))
    X = F.payments_features(p).to_numpy(np.float32)
    y = (p["is_fraud"].to_numpy() == 1).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def xgb_path(data, tmp_path_factory):
    import xgboost as xgb

    X, y = data
    b = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 0}, xgb.DMatrix(X, label=y), 20)
    path = tmp_path_factory.mktemp("m") / "model.ubj"
    b.save_model(str(path))
    return path, b


@pytest.fixture(scope="module")
def lgb_path(data, tmp_path_factory):
    import lightgbm as lgb

    X, y = data
    params = {"objective": "binary", "num_leaves": 7, "num_threads": 1, "verbosity": -1, "seed": 0}
    b = lgb.train(params, lgb.Dataset(X, label=y), 20)
    path = tmp_path_factory.mktemp("m") / "model.txt"
    b.save_model(str(path))
    return path, b


def test_choose_device():
    assert choose_device("cpu") == "cpu"
    assert choose_device("auto") in ("cpu", "cuda")
    assert choose_device("cuda") in ("cpu", "cuda")
    with pytest.raises(ModelError):
        choose_device("tpu")


def test_load_refuses_missing_and_mismatch(xgb_path, tmp_path):
    path, _ = xgb_path
    with pytest.raises(ModelError, match="not found"):
        GbdtModel.load(tmp_path / "nope.ubj", "xgboost", F.FEATURE_NAMES)
    with pytest.raises(ModelError, match="sha256"):
        GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, expected_sha256="0" * 64)
    with pytest.raises(ModelError, match="features"):
        GbdtModel.load(path, "xgboost", F.FEATURE_NAMES[:5], device="cpu")
    with pytest.raises(ModelError):
        GbdtModel.load(path, "catboost", F.FEATURE_NAMES, device="cpu")
    m = GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, expected_sha256=sha256_file(path), device="cpu")
    assert m.device == "cpu" and m.framework == "xgboost" and m.feature_names == F.FEATURE_NAMES


def test_load_refuses_a_model_registered_with_reordered_feature_names(xgb_path):
    path, _ = xgb_path
    names = list(F.FEATURE_NAMES)
    names[3], names[4] = names[4], names[3]  # customer_nb_tx_1d <-> customer_nb_tx_7d
    with pytest.raises(ModelError, match="position 3") as err:
        GbdtModel.load(path, "xgboost", names, device="cpu")
    assert "'customer_nb_tx_7d'" in str(err.value) and "'customer_nb_tx_1d'" in str(err.value)
    with pytest.raises(ModelError, match="nothing at position 26 where 'extra' is expected"):  # a feature the model lacks
        GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, device="cpu", expected_feature_names=[*F.FEATURE_NAMES, "extra"])
    # the right names, in order: it loads; names of a toy model load without the check
    assert GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, device="cpu").feature_names == F.FEATURE_NAMES
    toy = [f"f{i}" for i in range(len(F.FEATURE_NAMES))]
    assert GbdtModel.load(path, "xgboost", toy, device="cpu", expected_feature_names=None).feature_names == toy


@pytest.mark.parametrize("fw", ["xgboost", "lightgbm"])
def test_load_checks_the_boosters_own_feature_names(fw, data, tmp_path):
    """A booster trained with names carries them: they must be the registry's, in order."""
    import lightgbm as lgb
    import xgboost as xgb

    X, y = data
    reordered = [F.FEATURE_NAMES[1], F.FEATURE_NAMES[0], *F.FEATURE_NAMES[2:]]
    for names, ok in ((F.FEATURE_NAMES, True), (reordered, False)):
        path = tmp_path / (f"{fw}-{ok}." + ("ubj" if fw == "xgboost" else "txt"))
        if fw == "xgboost":
            d = xgb.DMatrix(X, label=y, feature_names=list(names))
            xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1}, d, 3).save_model(str(path))
        else:
            d = lgb.Dataset(X, label=y, feature_name=list(names))
            lgb.train({"objective": "binary", "num_leaves": 3, "num_threads": 1, "verbosity": -1}, d, 3).save_model(str(path))
        if ok:
            assert GbdtModel.load(path, fw, F.FEATURE_NAMES, device="cpu").feature_names == F.FEATURE_NAMES
        else:
            with pytest.raises(ModelError, match="booster's own feature names have 'is_weekend' at position 0 where 'amount'"):
                GbdtModel.load(path, fw, F.FEATURE_NAMES, device="cpu")
            # the check of the booster's names against the record's does not depend on expected_feature_names
            with pytest.raises(ModelError, match="position 0"):
                GbdtModel.load(path, fw, F.FEATURE_NAMES, device="cpu", expected_feature_names=None)
            assert GbdtModel.load(path, fw, reordered, device="cpu", expected_feature_names=None).feature_names == reordered


@pytest.mark.parametrize("fw", ["xgboost", "lightgbm"])
def test_predict_matches_booster(fw, data, xgb_path, lgb_path):
    import xgboost as xgb

    X, _ = data
    path, booster = xgb_path if fw == "xgboost" else lgb_path
    m = GbdtModel.load(path, fw, F.FEATURE_NAMES, device="cpu")
    ref = booster.predict(xgb.DMatrix(X[:500])) if fw == "xgboost" else booster.predict(X[:500])
    p = m.predict(X[:500])
    assert p.dtype == np.float64 and p.shape == (500,)
    np.testing.assert_allclose(p, ref, rtol=1e-6, atol=1e-7)
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(m.predict(X[3]), ref[3:4], rtol=1e-6)  # one row, 1-D input
    assert m.predict(X[:0]).shape == (0,)
    with pytest.raises(ModelError):
        m.predict(X[:2, :5])


@pytest.mark.parametrize("fw", ["xgboost", "lightgbm"])
def test_explain(fw, data, xgb_path, lgb_path):
    X, y = data
    path, _ = xgb_path if fw == "xgboost" else lgb_path
    m = GbdtModel.load(path, fw, F.FEATURE_NAMES, device="cpu")
    rows = np.r_[np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 0)[:5]]
    probs, expl = m.predict_and_explain(X[rows], top_k=3)
    assert len(expl) == len(rows) and all(len(e) == 3 for e in expl)
    full = m._contribs_with_bias(X[rows])[:, : len(F.FEATURE_NAMES)]
    # one pass gives both: the probabilities agree with predict()
    np.testing.assert_allclose(probs, m.predict(X[rows]), rtol=1e-5, atol=1e-6)
    for i, e in enumerate(expl):
        mags = [abs(c) for _, _, c in e]
        assert mags == sorted(mags, reverse=True)
        assert mags[0] == pytest.approx(np.abs(full[i]).max(), rel=1e-5)
        for code, feat, contrib in e:
            assert feat in F.FEATURE_NAMES
            assert code == feat.upper() + ("_HIGH" if contrib >= 0 else "_LOW")
    # frauds get a high score, and their top reason pushes the score up
    assert probs[:5].mean() > probs[5:].mean()
    assert all(e[0][2] > 0 for e in expl[:5])
    assert m.explain(X[:1], top_k=100)[0].__len__() == len(F.FEATURE_NAMES)


def test_train_on_simulated_payments_is_deterministic_and_loads(tmp_path):
    from scoring_service.training.decision_rules import choose_thresholds
    from scoring_service.training.train import train_on_payments

    p = F.normalise_handbook(simulate(700, 1400, "2018-04-01", 30, seed=11))
    r1 = train_on_payments(p, tmp_path / "a", rounds=25)
    r2 = train_on_payments(p, tmp_path / "b", rounds=25)
    assert sha256_file(r1.artifact_path) == sha256_file(r2.artifact_path)  # seeded, deterministic
    assert r1.metrics == r2.metrics and r1.thresholds == r2.thresholds
    assert set(r1.metrics) == {"auc_roc", "average_precision", "card_precision_at_100"}
    assert r1.metrics["auc_roc"] > 0.75
    assert 0 < r1.thresholds["review"] <= r1.thresholds["decline"] <= 1
    assert set(r1.policy) == {"amount_ratio_review", "amount_ratio_decline", "high_amount", "min_history",
                              "high_amount_fraud_rate", "amount_ratio_decline_fraud_rate", "amount_ratio_review_fraud_rate",
                              "velocity_1h_review", "velocity_1h_decline", "velocity_1h_review_fraud_rate",
                              "velocity_1h_decline_fraud_rate", "typical_amount"}
    assert all(0.0 <= r1.policy[k] <= 1.0 for k in r1.policy if k.endswith("_fraud_rate"))
    assert r1.policy["amount_ratio_review"] <= r1.policy["amount_ratio_decline"]
    assert (tmp_path / "a" / "train_result.json").is_file()
    m = GbdtModel.load(r1.artifact_path, r1.framework, r1.feature_names, expected_sha256=sha256_file(r1.artifact_path))
    assert m.predict(F.online_features_many([(500.0, 1525000000.0, None, None)])).shape == (1,)
    # thresholds: decline keeps precision >= 0.8, review keeps recall >= 0.8
    y = np.r_[np.zeros(90), np.ones(10)]
    s = np.r_[np.linspace(0, 0.5, 90), np.linspace(0.4, 1.0, 10)]
    th = choose_thresholds(y, s)
    assert y[s >= th["decline"]].mean() >= 0.8
    assert y[s >= th["review"]].sum() >= 8


def test_train_lightgbm(tmp_path):
    from scoring_service.training.train import train_on_payments

    p = F.normalise_handbook(simulate(500, 1000, "2018-04-01", 12, seed=12))
    r = train_on_payments(p, tmp_path, framework="lightgbm", rounds=20)
    assert r.framework == "lightgbm" and r.artifact_path.suffix == ".txt"
    m = GbdtModel.load(r.artifact_path, "lightgbm", r.feature_names)
    assert m.predict(np.zeros((2, len(F.FEATURE_NAMES)), np.float32)).shape == (2,)


def test_exact_reasons_only_for_flagged_rows(data, xgb_path):
    X, y = data
    path, _ = xgb_path
    m = GbdtModel.load(path, "xgboost", F.FEATURE_NAMES, device="cpu")
    rows = np.r_[np.flatnonzero(y == 1)[:20], np.flatnonzero(y == 0)[:200]]
    exact_p, exact_r = m.predict_and_explain(X[rows], top_k=3)
    ps = np.unique(exact_p)
    i = int(len(ps) * 0.8)
    cut = float((ps[i - 1] + ps[i]) / 2)  # midway between two rows: no row sits on the boundary
    mixed_p, mixed_r = m.predict_and_explain(X[rows], top_k=3, exact_from=cut)
    # the same probabilities whatever the attribution method (both sum to the margin)
    np.testing.assert_allclose(mixed_p, exact_p, rtol=1e-5, atol=1e-6)
    flagged = exact_p >= cut
    assert flagged.any() and (~flagged).any()
    for i in np.flatnonzero(flagged):  # flagged rows: exactly the TreeSHAP reasons
        assert [r[:2] for r in mixed_r[i]] == [r[:2] for r in exact_r[i]]
        np.testing.assert_allclose([r[2] for r in mixed_r[i]], [r[2] for r in exact_r[i]], rtol=1e-4, atol=1e-5)
    approx_p, approx_r = m.predict_and_explain(X[rows], top_k=3, exact_from=float("inf"))
    np.testing.assert_allclose(approx_p, exact_p, rtol=1e-5, atol=1e-6)
    assert all(len(r) == 3 for r in approx_r)
