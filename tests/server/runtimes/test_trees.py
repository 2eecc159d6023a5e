"""XGBoost and LightGBM runtimes on tiny models trained here on random data."""

from __future__ import annotations

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput, ModelLoadError

from tests.server.runtimes import tiny_models as tm
from tests.server.runtimes.conftest import infer, load, outputs, request

X, _ = tm.training_data(20)


def test_xgboost_classifier_matches_the_booster(tmp_path):
    xgb = pytest.importorskip("xgboost")
    booster = tm.save_xgboost(tmp_path)
    lm = load(tmp_path)
    assert type(lm.model).__name__ == "XGBoostModel" and lm.metadata.platform == "xgboost"
    assert [(t.name, t.datatype, t.shape) for t in lm.metadata.inputs] == [("input0", "FP32", [-1, 4])]
    out = outputs(infer(lm, request("m", ["predict", "predict_proba"], input0=X)))
    want = booster.predict(xgb.DMatrix(X))
    np.testing.assert_allclose(out["predict_proba"], want, rtol=1e-5)
    assert out["predict"].dtype == np.int64 and (out["predict"] == want.argmax(axis=1)).all()
    assert list(outputs(infer(lm, request("m", input0=X)))) == ["predict"]


@pytest.mark.parametrize("fname, objective", [("model.json", "binary:logistic"), ("model.bst", "reg:squarederror")])
def test_xgboost_binary_and_regression(tmp_path, fname, objective):
    xgb = pytest.importorskip("xgboost")
    booster = tm.save_xgboost(tmp_path, fname, objective)
    lm = load(tmp_path)
    want = booster.predict(xgb.DMatrix(X))
    if objective.startswith("binary"):
        out = outputs(infer(lm, request("m", ["predict_proba", "predict"], input0=X)))
        np.testing.assert_allclose(out["predict_proba"][:, 1], want, rtol=1e-5)
        assert (out["predict"] == (want > 0.5)).all()
    else:
        np.testing.assert_allclose(outputs(infer(lm, request("m", input0=X)))["predict"], want, rtol=1e-6)
        assert [t.name for t in lm.metadata.outputs] == ["predict"]
        with pytest.raises(ModelLoadError, match="needs a classifier"):
            load(tmp_path, parameters={"method": "predict_proba"})


def test_lightgbm_classifier_matches_the_booster(tmp_path):
    pytest.importorskip("lightgbm")
    booster = tm.save_lightgbm(tmp_path)
    lm = load(tmp_path, parameters={"method": "predict_proba", "threads": 1})
    assert type(lm.model).__name__ == "LightGBMModel"
    out = outputs(infer(lm, request("m", input0=X)))
    np.testing.assert_allclose(out["predict_proba"], booster.predict(X), rtol=1e-5)
    labels = outputs(infer(lm, request("m", ["predict"], input0=X)))["predict"]
    assert (labels == booster.predict(X).argmax(axis=1)).all()


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_lightgbm_binary_and_regression(tmp_path, objective):
    pytest.importorskip("lightgbm")
    booster = tm.save_lightgbm(tmp_path, objective)
    lm = load(tmp_path)
    want = booster.predict(X)
    if objective == "binary":
        proba = outputs(infer(lm, request("m", ["predict_proba"], input0=X)))["predict_proba"]
        np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
        np.testing.assert_allclose(proba[:, 1], want, rtol=1e-5)
    else:
        np.testing.assert_allclose(outputs(infer(lm, request("m", input0=X)))["predict"], want, rtol=1e-6)


def test_tree_input_errors(tmp_path):
    pytest.importorskip("lightgbm")
    tm.save_lightgbm(tmp_path)
    lm = load(tmp_path, name="gbm")
    with pytest.raises(InvalidInput, match=r"model 'gbm': input 'input0' must have shape \[-1, 4\]"):
        infer(lm, request("gbm", input0=np.ones((2, 7), np.float32)))
    with pytest.raises(InvalidInput, match="must be FP32, got FP64"):
        infer(lm, request("gbm", input0=np.ones((2, 4))))
    with pytest.raises(InvalidInput, match="has no output 'transform'"):
        infer(lm, request("gbm", ["transform"], input0=X))


def test_garbage_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.ubj").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="model.ubj is not an XGBoost model"):
        load(tmp_path / "x")
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "model.txt").write_text("tree\nnot really\n")
    with pytest.raises(ModelLoadError, match="model.txt is not a LightGBM model"):
        load(tmp_path / "l")
