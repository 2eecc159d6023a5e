"""LightGBM models in the text format ``Booster.save_model`` writes. Classifiers
(``binary``, ``multiclass``, ``multiclassova`` objectives) answer ``predict``
(class ids) and ``predict_proba``; others answer ``predict``. Parameters:
``file``, ``method``, ``threads``."""

from __future__ import annotations

from typing import Any

import numpy as np
from meshserve.protocol.errors import ModelLoadError
from meshserve.server.memory import measure_rss
from meshserve.server.runtimes.base import error_summary
from meshserve.server.runtimes.files import LIGHTGBM_SUFFIXES, find_model_file, is_lightgbm_text
from meshserve.server.runtimes.trees import TreeModel


def _objective(file: Any) -> str:
    """The objective line of the text format's header (the trees follow it)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("objective="):
                return line.split("=", 1)[1].split()[0]
            if line.startswith("Tree="):
                break
    return ""


class LightGBMModel(TreeModel):
    _platform = "lightgbm"

    def load(self) -> None:
        import lightgbm as lgb

        assert self.path is not None
        file = find_model_file(self.path, LIGHTGBM_SUFFIXES, self.parameters.get("file"), accept=is_lightgbm_text)
        with measure_rss() as grown:
            try:
                booster = lgb.Booster(model_file=str(file))
            except Exception as e:
                raise ModelLoadError(f"{file.name} is not a LightGBM model: {error_summary(e)}") from None
        objective = _objective(file)
        self._classifier = objective in ("binary", "multiclass", "multiclassova")
        self._n_classes = max(2, booster.num_model_per_iteration()) if self._classifier else 0
        self._n_features = booster.num_feature()
        self._threads = int(self.parameters.get("threads") or 0)
        self._booster = booster
        self._size = max(grown.bytes, file.stat().st_size)
        self._finish_load()

    def _scores(self, x: np.ndarray) -> np.ndarray:
        kw = {"num_threads": self._threads} if self._threads else {}
        return np.asarray(self._booster.predict(x, **kw))

    def _predict_raw(self, x: np.ndarray) -> np.ndarray:
        scores = self._scores(x)
        if not self._classifier:
            return scores.astype(np.float32)
        if scores.ndim == 2:
            return scores.argmax(axis=1).astype(np.int64)
        return (scores > 0.5).astype(np.int64)

    def _predict_proba(self, x: np.ndarray) -> np.ndarray:
        scores = self._scores(x)
        return scores if scores.ndim == 2 else np.stack([1 - scores, scores], axis=1)

    def unload(self) -> None:
        self._booster = None
