"""The one fit path every probe shares: check and stack the rows, let the probe choose its
hyper-parameters on train+validation, predict the test rows once, score them.

Rules shared by every probe:
* hyper-parameters are chosen from train+validation only; test rows are only ever
  passed to ``predict``/``predict_proba`` of the final estimator;
* sparse inputs stay sparse (MaxAbsScaler, lbfgs on CSR), dense inputs are standardised;
* fixed seeds and single-process fitting so that two runs give identical numbers.

Validation score (``ProbeResult.validation_macro_f1``), one rule for every probe: the mean macro-F1 over
the stratified K folds of train+validation (shuffled with the probe's seed, so every probe of a
partition sees the same folds) at the hyper-parameters the probe chose. It never touches test rows
and is what "best configuration" is chosen by everywhere (``mosaic_dag.evaluation.selection``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import StratifiedKFold, cross_val_score
from threadpoolctl import threadpool_limits

from mosaic_dag.probes.metrics import Metrics, evaluate

Matrix = sp.spmatrix | sp.sparray | np.ndarray

__all__ = ["Choice", "FitFn", "FitRows", "Matrix", "ProbeResult", "Split", "cv_macro_f1", "fit_probe", "predict", "prep"]


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """A fitted probe and its test metrics; ``estimator`` takes the same columns as ``fit`` got
    (for the k-sparse probe its first step selects ``selected_features``)."""

    classifier: str
    k: int | None
    params: dict[str, Any]
    metrics: Metrics
    estimator: BaseEstimator
    selected_features: np.ndarray | None
    test_pred: np.ndarray
    test_proba: np.ndarray | None
    classes: np.ndarray = field(default_factory=lambda: np.empty(0))
    selection_score: float = float("nan")
    validation_macro_f1: float = float("nan")


class FitFn(Protocol):
    """The probes-API fit that transfer and the hard conditions call: every ``fit_*`` of mosaic_dag.probes."""

    def __call__(self, X_train: Matrix, y_train: npt.ArrayLike, X_validation: Matrix, y_validation: npt.ArrayLike,
                 X_test: Matrix, y_test: npt.ArrayLike, *, seed: int, n_boot: int) -> ProbeResult: ...


def prep(X: Any) -> Any:
    """CSR for sparse (float32/64 kept), ndarray for dense; never densifies. Anything else (texts) as is."""
    if sp.issparse(X):
        out = sp.csr_matrix(X)
        if out.dtype not in (np.float32, np.float64):
            out = out.astype(np.float32)
        return out
    if not isinstance(X, np.ndarray) and not hasattr(X, "__array__"):
        return X
    arr = np.asarray(X)
    if arr.dtype.kind in "OUS":
        return X
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return arr


def _check_xy(name: str, X: Matrix, y: npt.ArrayLike) -> np.ndarray:
    yy = np.asarray(y)
    if yy.ndim != 1 or X.shape[0] != yy.shape[0]:
        raise ValueError(f"{name}: X has {X.shape[0]} rows but y has shape {yy.shape}")
    return yy


def _stack(a: Matrix, b: Matrix) -> Matrix:
    if sp.issparse(a) != sp.issparse(b):
        raise ValueError("X_train/X_validation: must be both sparse or both dense")
    if sp.issparse(a):
        return sp.vstack([sp.csr_matrix(a), sp.csr_matrix(b)], format="csr")
    return np.vstack([np.asarray(a), np.asarray(b)])


def n_splits_for(y: np.ndarray, wanted: int) -> int:
    """Folds for stratified CV: ``wanted``, fewer when the smallest class has fewer rows."""
    _, counts = np.unique(y, return_counts=True)
    if counts.size < 2:
        raise ValueError("y_train: need at least two classes in train+validation")
    n = int(min(wanted, counts.min()))
    if n < 2:
        raise ValueError("y_train: every class needs at least 2 rows in train+validation for CV")
    return n


def cv_folds(y_fit: np.ndarray, n_splits: int, seed: int) -> StratifiedKFold:
    """The stratified folds of train+validation every probe of a partition shares (same seed, same folds)."""
    return StratifiedKFold(n_splits=n_splits_for(y_fit, n_splits), shuffle=True, random_state=seed)


def cv_macro_f1(estimator: BaseEstimator, X_fit: Matrix, y_fit: np.ndarray, *, n_splits: int = 5, seed: int = 0) -> float:
    """Mean macro-F1 over the same stratified folds of train+validation that the logistic C search uses."""
    cv = cv_folds(y_fit, n_splits, seed)
    return float(np.mean(cross_val_score(clone(estimator), X_fit, y_fit, scoring="f1_macro", cv=cv)))


def predict(estimator: BaseEstimator, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions (and class probabilities when the estimator has them) of a fitted probe on new rows."""
    X = prep(X)
    pred = np.asarray(estimator.predict(X))
    proba = np.asarray(estimator.predict_proba(X)) if hasattr(estimator, "predict_proba") else None
    return pred, proba


@dataclass(frozen=True, eq=False)
class Split:
    """One partition's train / validation / test rows of one feature matrix; ``ids_test`` names the test rows."""

    X_train: Matrix
    y_train: np.ndarray
    X_validation: Matrix
    y_validation: np.ndarray
    X_test: Matrix
    y_test: np.ndarray
    ids_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        for part in ("train", "validation", "test"):
            X = getattr(self, f"X_{part}")
            y = np.asarray(getattr(self, f"y_{part}"))
            object.__setattr__(self, f"y_{part}", y)
            if y.ndim != 1 or X.shape[0] != y.shape[0]:
                raise ValueError(f"X_{part}: has {X.shape[0]} rows but y_{part} has shape {y.shape}")
        if self.ids_test is None:
            object.__setattr__(self, "ids_test", np.arange(self.y_test.shape[0]))
        ids = np.asarray(self.ids_test)
        if ids.shape != self.y_test.shape:
            raise ValueError(f"ids_test: has shape {ids.shape} but y_test has shape {self.y_test.shape}")
        object.__setattr__(self, "ids_test", ids)

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def labels(self) -> frozenset[Any]:
        """Every label the partition uses, over all three splits."""
        ys = np.concatenate([self.y_train, self.y_validation, self.y_test])
        return frozenset(np.unique(ys).tolist())


@dataclass(frozen=True, eq=False)
class FitRows(Split):
    """Checked, prepared rows, and train+validation stacked (what the final estimator learns from)."""

    X_fit: Matrix | None = None
    y_fit: np.ndarray = field(default_factory=lambda: np.empty(0))

    @classmethod
    def of(cls, X_train: Matrix, y_train: npt.ArrayLike, X_validation: Matrix, y_validation: npt.ArrayLike,
           X_test: Matrix, y_test: npt.ArrayLike) -> "FitRows":
        Xtr, Xva, Xte = prep(X_train), prep(X_validation), prep(X_test)
        ytr = _check_xy("X_train", Xtr, y_train)
        yva = _check_xy("X_validation", Xva, y_validation)
        yte = _check_xy("X_test", Xte, y_test)
        return cls(Xtr, ytr, Xva, yva, Xte, yte, X_fit=_stack(Xtr, Xva), y_fit=np.concatenate([ytr, yva]))


@dataclass(frozen=True, eq=False)
class Choice:
    """What a probe's hyper-parameter search returns: the estimator refit on train+validation and its scores."""

    estimator: BaseEstimator
    params: dict[str, Any]
    selection_score: float
    validation_macro_f1: float


def fit_probe(classifier: str, choose: Callable[[FitRows], Choice], rows: FitRows, *, seed: int, n_boot: int,
              blas_threads: int | None = None) -> ProbeResult:
    """Run ``choose`` on train+validation, then predict and score the test rows once.

    ``blas_threads`` caps BLAS threads during the search and the test prediction (None: leave as is)."""
    limit = threadpool_limits(limits=blas_threads) if blas_threads is not None else contextlib.nullcontext()
    with limit:
        chosen = choose(rows)
        pred, proba = predict(chosen.estimator, rows.X_test)
    classes = np.asarray(chosen.estimator.classes_)
    return ProbeResult(
        classifier=classifier,
        k=None,
        params=chosen.params,
        metrics=evaluate(rows.y_test, pred, proba, classes, seed, n_train=rows.X_fit.shape[0], n_boot=n_boot),
        estimator=chosen.estimator,
        selected_features=None,
        test_pred=pred,
        test_proba=proba,
        classes=classes,
        selection_score=chosen.selection_score,
        validation_macro_f1=chosen.validation_macro_f1,
    )
