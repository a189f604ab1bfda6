"""Models for the demo, tests and benchmarks, trained on data that ships with scikit-learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits, make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from clipstream.models.files import save_model


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits (1,797 8x8 images, 64 features) split 70/30, stratified."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, random_state=seed, stratify=y
    )
    return X_train, X_test, y_train, y_test


def digits_estimators(seed: int = 0) -> dict[str, Any]:
    return {
        "digits-logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "digits-forest": RandomForestClassifier(n_estimators=100, n_jobs=1, random_state=seed),
        "digits-knn": KNeighborsClassifier(n_neighbors=3),
        "digits-svc": CalibratedClassifierCV(SVC(random_state=seed), ensemble=False),
        # middling and deliberately weak: what the bandit should learn to trust less
        "digits-tree": DecisionTreeClassifier(max_depth=5, random_state=seed),
        "digits-weak": DecisionTreeClassifier(max_depth=2, random_state=seed),
    }


def train_digits_models(
    out_dir: Path | str, seed: int = 0, names: list[str] | None = None
) -> dict[str, tuple[Path, float]]:
    """Train and skops-save the digits models; name -> (path, offline test accuracy)."""
    out_dir = Path(out_dir)
    X_train, X_test, y_train, y_test = digits_split(seed)
    trained = {}
    for name, estimator in digits_estimators(seed).items():
        if names is not None and name not in names:
            continue
        estimator.fit(X_train, y_train)
        accuracy = float(estimator.score(X_test, y_test))
        trained[name] = (save_model(estimator, out_dir / f"{name}.skops"), accuracy)
    return trained


def wide_dataset(
    n: int = 6000, dim: int = 784, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An MNIST-shaped problem (784 features, 10 classes), generated: no download."""
    X, y = make_classification(
        n_samples=n,
        n_features=dim,
        n_informative=60,
        n_redundant=40,
        n_classes=10,
        n_clusters_per_class=2,
        random_state=seed,
    )
    return tuple(train_test_split(X, y, test_size=0.25, random_state=seed))  # type: ignore[return-value]


def train_wide_model(out_dir: Path | str, dim: int = 784, seed: int = 0) -> tuple[Path, float]:
    X_train, X_test, y_train, y_test = wide_dataset(dim=dim, seed=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(X_train, y_train)
    return save_model(model, Path(out_dir) / f"wide{dim}-logreg.skops"), float(
        model.score(X_test, y_test)
    )
