"""Logistic probe: balanced multinomial logistic regression, C chosen by stratified K-fold CV on train+validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from mosaic_dag.probes.fit import Choice, FitRows, Matrix, ProbeResult, cv_folds, fit_probe
from mosaic_dag.probes.wide import fit_on_active_columns

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)

__all__ = ["DEFAULT_CS", "fit_logistic", "logistic_pipeline"]


def logistic_pipeline(sparse: bool, scale: bool, seed: int, max_iter: int, tol: float) -> Pipeline:
    """Scaler (MaxAbs for sparse so CSR stays sparse, standard for dense, none) + balanced lbfgs logistic."""
    scaler: Any
    if not scale:
        scaler = "passthrough"
    elif sparse:
        scaler = MaxAbsScaler()
    else:
        scaler = StandardScaler()
    clf = LogisticRegression(C=1.0, class_weight="balanced", solver="lbfgs", max_iter=max_iter, tol=tol,
                             random_state=seed)
    return Pipeline([("scale", scaler), ("clf", clf)])


def fit_logistic(X_train: Matrix, y_train: npt.ArrayLike, X_validation: Matrix, y_validation: npt.ArrayLike,
                 X_test: Matrix, y_test: npt.ArrayLike, *, Cs: Sequence[float] = DEFAULT_CS, n_splits: int = 5,
                 seed: int = 0, scale: bool = True, max_iter: int = 1000, tol: float = 1e-4, n_boot: int = 1000,
                 classifier: str = "logistic", blas_threads: int | None = 1) -> ProbeResult:
    """Balanced multinomial logistic regression; C by stratified K-fold CV on train+validation.

    The final estimator is refit on train+validation with the chosen C. Test rows are used only
    for prediction. ``blas_threads`` caps BLAS threads during the fit (None: leave as
    is): lbfgs works on small dense vectors, where extra threads mostly spin on a busy
    machine; one thread is also bit-reproducible.
    """

    def choose(rows: FitRows) -> Choice:
        if not Cs:
            raise ValueError("Cs: need at least one value")
        cv = cv_folds(rows.y_fit, n_splits, seed)
        search = GridSearchCV(
            logistic_pipeline(sp.issparse(rows.X_fit), scale, seed, max_iter, tol),
            {"clf__C": [float(c) for c in Cs]},
            scoring="f1_macro",
            cv=cv,
            refit=True,
            n_jobs=None,
            error_score="raise",
        )
        estimator = fit_on_active_columns(search, rows.X_fit, rows.y_fit)  # wide SAEs: most latents never fire
        return Choice(estimator, {"C": float(search.best_params_["clf__C"]),
                                  "n_splits": int(cv.get_n_splits())},
                      float(search.best_score_), float(search.best_score_))

    rows = FitRows.of(X_train, y_train, X_validation, y_validation, X_test, y_test)
    return fit_probe(classifier, choose, rows, seed=seed, n_boot=n_boot, blas_threads=blas_threads)
