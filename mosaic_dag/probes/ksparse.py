"""k-sparse probe: a Pipeline of a class-mean-difference selector (k columns, chosen on train rows) and the
logistic probe, so ``predict`` takes the full feature matrix like every other probe."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from mosaic_dag.probes.fit import Matrix, ProbeResult, _check_xy, prep
from mosaic_dag.probes.linear import fit_logistic

DEFAULT_KS: tuple[int, ...] = (1, 5, 20, 100)

__all__ = ["DEFAULT_KS", "ClassMeanSelector", "class_mean_difference", "fit_ksparse", "select_features"]


def class_mean_difference(X: Matrix, y: np.ndarray) -> np.ndarray:
    """Score of each column: max over classes c of |mean(X[y == c]) - mean(X[y != c])| (dense, never densifies X)."""
    labels, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if labels.size < 2:
        raise ValueError("y_train: need at least two classes to select features")
    n = y.size
    onehot = np.zeros((n, labels.size), dtype=np.float64)
    onehot[np.arange(n), y_idx] = 1.0
    if sp.issparse(X):
        class_sums = np.asarray(X.T @ onehot).T  # sparse @ dense -> dense [n_classes, width]
    else:
        class_sums = onehot.T @ X.astype(np.float64)
    total = class_sums.sum(axis=0)
    cnt = counts.astype(np.float64)[:, None]
    diff = class_sums / cnt - (total[None, :] - class_sums) / (n - cnt)
    return np.abs(diff).max(axis=0)


def select_features(X_train: Matrix, y_train: npt.ArrayLike, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest class-mean difference on train, highest score first;
    ties go to the lower index."""
    X = prep(X_train)
    y = _check_xy("X_train", X, y_train)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    score = class_mean_difference(X, y)
    return np.argsort(-score, kind="stable")[: min(int(k), score.size)].astype(np.int64)


class ClassMeanSelector(TransformerMixin, BaseEstimator):
    """SelectKBest-like: keeps the ``k`` columns with the largest class-mean difference, highest score first
    (ties: the lower index). Unlike SelectKBest it keeps score order, which the probe's weights follow."""

    def __init__(self, k: int = 1) -> None:
        self.k = k

    def fit(self, X: Matrix, y: npt.ArrayLike) -> "ClassMeanSelector":
        self.indices_ = select_features(X, y, self.k)
        self.n_features_in_ = int(X.shape[1])
        return self

    def transform(self, X: Matrix) -> Matrix:
        return X[:, self.indices_] if sp.issparse(X) else np.asarray(X)[:, self.indices_]

    def get_support(self, indices: bool = False) -> np.ndarray:
        if indices:
            return self.indices_
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.indices_] = True
        return mask


def fit_ksparse(X_train: Matrix, y_train: npt.ArrayLike, X_validation: Matrix, y_validation: npt.ArrayLike,
                X_test: Matrix, y_test: npt.ArrayLike, k: int, **logistic_kwargs: Any) -> ProbeResult:
    """Logistic regression on the ``k`` train-selected columns; the estimator is selector + logistic.

    Its ``validation_macro_f1`` is the CV score on those columns; they were picked on train rows, some of
    which sit in the held-out folds, so it leans slightly optimistic (test rows are never involved).
    """
    selector = ClassMeanSelector(k).fit(X_train, y_train)
    Xtr, Xva, Xte = (selector.transform(prep(X)) for X in (X_train, X_validation, X_test))
    res = fit_logistic(Xtr, y_train, Xva, y_validation, Xte, y_test, classifier="ksparse", **logistic_kwargs)
    idx = selector.indices_
    return dataclasses.replace(res, k=int(k), params={**res.params, "k_selected": int(idx.size)},
                               estimator=Pipeline([("select", selector), *res.estimator.steps]),
                               selected_features=idx)
