"""Logistic probes on very wide sparse features: fit on the columns that are active, answer at full width.

Most latents of a 262k- or 1M-wide SAE never fire on the fit rows. A column that is zero in every fit
row gets weight exactly zero under an L2 penalty (its gradient is the penalty term alone, which starts
and stays at zero), and MaxAbsScaler leaves it at scale 1. So fitting the grid search on the active
columns only and placing the coefficients back into a full-width pipeline gives the same model up to
the solver's floating-point rounding, while L-BFGS keeps its history over the active columns instead
of the whole width. The returned pipeline is plain scikit-learn (so it saves and loads like any other
probe) and accepts full-width rows, including test rows with values in columns never seen in fitting.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

__all__ = ["active_columns", "fit_on_active_columns", "widen_pipeline"]


def active_columns(X: Any) -> np.ndarray:
    """Sorted indices of the columns with at least one non-zero stored value."""
    X = sp.csr_matrix(X)
    return np.flatnonzero(np.bincount(X.indices[X.data != 0], minlength=X.shape[1]))


def widen_pipeline(model: Pipeline, active: np.ndarray, width: int) -> Pipeline:
    """A copy of a fitted [scaler, logistic] pipeline on ``active`` columns, as if fitted on all ``width``.

    Inactive columns get what a full-width fit gives them: MaxAbsScaler max 0 / scale 1, weight 0.
    """
    steps = []
    for name, step in model.steps:
        if isinstance(step, MaxAbsScaler):
            wide = copy.copy(step)
            wide.max_abs_ = np.zeros(width, dtype=step.max_abs_.dtype)
            wide.max_abs_[active] = step.max_abs_
            wide.scale_ = np.ones(width, dtype=step.scale_.dtype)
            wide.scale_[active] = step.scale_
            wide.n_features_in_ = width
            step = wide
        elif isinstance(step, LogisticRegression):
            wide = copy.copy(step)
            wide.coef_ = np.zeros((step.coef_.shape[0], width), dtype=step.coef_.dtype)
            wide.coef_[:, active] = step.coef_
            wide.n_features_in_ = width
            step = wide
        elif step not in ("passthrough", None):
            raise TypeError(f"model: cannot widen a pipeline step of type {type(step).__name__}")
        steps.append((name, step))
    return Pipeline(steps)


def fit_on_active_columns(search: Any, X: Any, y: np.ndarray) -> Pipeline:
    """``search.fit(X, y)`` on X's active columns (sparse X with inactive ones); the best pipeline at full width.

    ``search`` is a GridSearchCV over a [scaler, LogisticRegression] pipeline; its ``best_estimator_``
    is replaced by the full-width pipeline, its scores and parameters are those of the reduced fit
    (equal to the full fit's). Dense X, or sparse X whose every column is active, is fitted as is.
    """
    if not sp.issparse(X):
        search.fit(X, y)
        return search.best_estimator_
    active = active_columns(X)
    width = int(X.shape[1])
    if active.size == width or active.size == 0:
        search.fit(X, y)
        return search.best_estimator_
    search.fit(sp.csr_matrix(X)[:, active], y)
    search.best_estimator_ = widen_pipeline(search.best_estimator_, active, width)
    return search.best_estimator_
