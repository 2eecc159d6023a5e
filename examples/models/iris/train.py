"""Train the iris example (run by `make serve`; the model file is not committed,
so it always matches the installed scikit-learn)."""

from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

here = Path(__file__).resolve().parent
X, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=1000).fit(X, y)
joblib.dump(model, here / "model.joblib")
print(f"wrote {here / 'model.joblib'} (train accuracy {model.score(X, y):.3f})")
