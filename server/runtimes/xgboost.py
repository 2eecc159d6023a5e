"""XGBoost models in the formats ``Booster.save_model`` writes (``.ubj``, ``.json``,
and the legacy binary ``.bst``/``.model``). Classifiers (``binary:*``,
``multi:*`` objectives) answer ``predict`` (class ids) and ``predict_proba``;
regressors answer ``predict``. Parameters: ``file``, ``method``, ``threads``."""

from __future__ import annotations

import json

import numpy as np
from meshserve.protocol.errors import ModelLoadError
from meshserve.server.memory import measure_rss
from meshserve.server.runtimes.base import error_summary
from meshserve.server.runtimes.files import XGBOOST_SUFFIXES, find_model_file, is_xgboost_file
from meshserve.server.runtimes.trees import TreeModel


class XGBoostModel(TreeModel):
    _platform = "xgboost"

    def load(self) -> None:
        import xgboost as xgb

        assert self.path is not None
        file = find_model_file(self.path, XGBOOST_SUFFIXES, self.parameters.get("file"), accept=is_xgboost_file)
        with measure_rss() as grown:
            booster = xgb.Booster()
            try:
                booster.load_model(str(file))
            except Exception as e:
                raise ModelLoadError(f"{file.name} is not an XGBoost model: {error_summary(e)}") from None
        if self.parameters.get("threads"):
            booster.set_param({"nthread": int(self.parameters["threads"])})
        learner = json.loads(booster.save_config())["learner"]
        self._objective = learner["objective"]["name"]
        self._classifier = self._objective.startswith(("binary:", "multi:"))
        self._n_classes = max(2, int(float(learner["learner_model_param"].get("num_class", 0))))
        self._n_features = booster.num_features()
        self._booster = booster
        self._size = max(grown.bytes, file.stat().st_size)
        self._finish_load()

    def _margin(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._booster.inplace_predict(x, predict_type="margin"))

    def _predict_raw(self, x: np.ndarray) -> np.ndarray:
        if not self._classifier:
            return np.asarray(self._booster.inplace_predict(x), dtype=np.float32)
        margin = self._margin(x)
        if margin.ndim == 2:
            return margin.argmax(axis=1).astype(np.int64)
        return (margin > 0).astype(np.int64)

    def _predict_proba(self, x: np.ndarray) -> np.ndarray:
        margin = self._margin(x).astype(np.float64)
        if margin.ndim == 2:  # softmax over classes
            e = np.exp(margin - margin.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        p = 1.0 / (1.0 + np.exp(-margin))
        return np.stack([1 - p, p], axis=1)

    def unload(self) -> None:
        self._booster = None
