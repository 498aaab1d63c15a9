"""Probes on pooled features: logistic regression, decision tree, k-sparse logistic.

Rules shared by every probe:
* hyper-parameters are chosen from train+validation only; test rows are only ever
  passed to ``predict``/``predict_proba`` of the final model;
* sparse inputs stay sparse (MaxAbsScaler, lbfgs on CSR), dense inputs are standardised;
* fixed seeds and single-process fitting so that two runs give identical numbers.

Validation score (``ProbeResult.val_macro_f1``), one rule for every probe: the mean macro-F1 over
the stratified K folds of train+validation (shuffled with the probe's seed, so every probe of a
partition sees the same folds) at the hyper-parameters the probe chose. It never touches test rows
and is what "best configuration" is chosen by everywhere (``mosaic_dag.evaluation.sweeps``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import skops.io as sio
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from mosaic_dag.probes.wide import fit_on_active_columns
from mosaic_dag.storage import temp_prefix

Matrix = sp.spmatrix | sp.sparray | np.ndarray

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
DEFAULT_MAX_DEPTHS: tuple[int | None, ...] = (2, 4, 8, 16, None)
DEFAULT_MIN_SAMPLES_LEAF: tuple[int, ...] = (1, 5, 20)
DEFAULT_KS: tuple[int, ...] = (1, 5, 20, 100)

__all__ = [
    "DEFAULT_CS",
    "DEFAULT_KS",
    "DEFAULT_MAX_DEPTHS",
    "DEFAULT_MIN_SAMPLES_LEAF",
    "Metrics",
    "ProbeResult",
    "evaluate",
    "fit_ksparse",
    "fit_logistic",
    "fit_tree",
    "cv_macro_f1",
    "resampled_macro_f1",
    "load_model",
    "majority_baseline_f1",
    "save_model",
    "select_features",
    "top_latents",
]


@dataclass(frozen=True)
class Metrics:
    """Test-set metrics. ``auroc`` is NaN when undefined (a class absent from y_true)."""

    macro_f1: float
    macro_f1_ci_low: float
    macro_f1_ci_high: float
    accuracy: float
    auroc: float
    per_class: dict[str, dict[str, float]]
    n_train: int
    n_test: int


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """A fitted probe and its test metrics.

    ``model`` expects the columns it was fitted on: for the k-sparse probe that is
    ``X[:, selected_features]``.
    """

    classifier: str
    k: int | None
    params: dict[str, Any]
    metrics: Metrics
    model: BaseEstimator
    selected_features: np.ndarray | None
    test_pred: np.ndarray
    test_proba: np.ndarray | None
    classes: np.ndarray = field(default_factory=lambda: np.empty(0))
    selection_score: float = float("nan")
    val_macro_f1: float = float("nan")


# --------------------------------------------------------------------------- helpers


def _stack(a: Matrix, b: Matrix) -> Matrix:
    if sp.issparse(a) != sp.issparse(b):
        raise ValueError("X_train/X_val: must be both sparse or both dense")
    if sp.issparse(a):
        return sp.vstack([sp.csr_matrix(a), sp.csr_matrix(b)], format="csr")
    return np.vstack([np.asarray(a), np.asarray(b)])


def _prep(X: Matrix) -> Matrix:
    """CSR for sparse (float32/64 kept), ndarray for dense; never densifies."""
    if sp.issparse(X):
        out = sp.csr_matrix(X)
        if out.dtype not in (np.float32, np.float64):
            out = out.astype(np.float32)
        return out
    arr = np.asarray(X)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return arr


def _check_xy(name: str, X: Matrix, y: npt.ArrayLike) -> np.ndarray:
    yy = np.asarray(y)
    if yy.ndim != 1 or X.shape[0] != yy.shape[0]:
        raise ValueError(f"{name}: X has {X.shape[0]} rows but y has shape {yy.shape}")
    return yy


def _n_splits(y: np.ndarray, wanted: int) -> int:
    _, counts = np.unique(y, return_counts=True)
    if counts.size < 2:
        raise ValueError("y_train: need at least two classes in train+validation")
    n = int(min(wanted, counts.min()))
    if n < 2:
        raise ValueError("y_train: every class needs at least 2 rows in train+validation for CV")
    return n


def _logistic_pipeline(sparse: bool, scale: bool, seed: int, max_iter: int, tol: float) -> Pipeline:
    scaler: Any
    if not scale:
        scaler = "passthrough"
    elif sparse:
        scaler = MaxAbsScaler()
    else:
        scaler = StandardScaler()
    clf = LogisticRegression(
        C=1.0,
        class_weight="balanced",
        solver="lbfgs",
        max_iter=max_iter,
        tol=tol,
        random_state=seed,
    )
    return Pipeline([("scale", scaler), ("clf", clf)])


def cv_macro_f1(estimator: BaseEstimator, X_fit: Matrix, y_fit: np.ndarray, *, n_splits: int = 5, seed: int = 0) -> float:
    """Mean macro-F1 over the same stratified folds of train+validation that the logistic C search uses."""
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    cv = StratifiedKFold(n_splits=_n_splits(y_fit, n_splits), shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clone(estimator), X_fit, y_fit, scoring="f1_macro", cv=cv)))


def _predict(model: BaseEstimator, X: Matrix) -> tuple[np.ndarray, np.ndarray | None]:
    pred = np.asarray(model.predict(X))
    proba = np.asarray(model.predict_proba(X)) if hasattr(model, "predict_proba") else None
    return pred, proba


# --------------------------------------------------------------------------- metrics


def resampled_macro_f1(t: np.ndarray, p: np.ndarray, n_labels: int, idx: np.ndarray) -> np.ndarray:
    """Macro-F1 of each resample (one row of ``idx`` = the row positions drawn) via confusion matrices.

    Labels with tp+fp+fn == 0 in a resample are left out of the mean, which is
    exactly sklearn's default label set (labels seen in y_true or y_pred).
    """
    b = idx.shape[0]
    c2 = n_labels * n_labels
    pair = t.astype(np.int64) * n_labels + p.astype(np.int64)
    keys = pair[idx] + (np.arange(b, dtype=np.int64) * c2)[:, None]
    conf = np.bincount(keys.ravel(), minlength=b * c2).reshape(b, n_labels, n_labels)
    tp = np.diagonal(conf, axis1=1, axis2=2).astype(np.float64)
    fn = conf.sum(axis=2) - tp
    fp = conf.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    return np.nanmean(f1, axis=1)


def _bootstrap_macro_f1(
    t: np.ndarray, p: np.ndarray, n_labels: int, n_boot: int, seed: int, chunk: int = 100
) -> np.ndarray:
    """Macro-F1 on ``n_boot`` resamples of the test rows (seeded)."""
    rng = np.random.default_rng(seed)
    n = t.size
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        out[start : start + b] = resampled_macro_f1(t, p, n_labels, rng.integers(0, n, size=(b, n)))
    return out


def _auroc(y_true: np.ndarray, proba: np.ndarray | None, classes: np.ndarray) -> float:
    if proba is None or classes.size < 2:
        return float("nan")
    present = set(np.unique(y_true).tolist())
    if present != set(classes.tolist()):
        return float("nan")
    if classes.size == 2:
        return float(roc_auc_score(y_true == classes[1], proba[:, 1]))
    return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes))


def evaluate(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    proba: np.ndarray | None,
    classes: npt.ArrayLike,
    seed: int = 0,
    *,
    n_train: int = 0,
    n_boot: int = 1000,
) -> Metrics:
    """Macro-F1 (+ bootstrap 95% CI), accuracy, AUROC and a per-class report.

    ``proba`` columns must follow ``classes`` (i.e. ``model.classes_``). Binary AUROC
    uses the proba of ``classes[1]``; multiclass is one-vs-rest macro.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    cls = np.asarray(classes)
    if yt.shape != yp.shape or yt.ndim != 1 or yt.size == 0:
        raise ValueError(f"y_true/y_pred: need equal non-empty 1-D shapes, got {yt.shape} and {yp.shape}")
    macro = float(f1_score(yt, yp, average="macro", zero_division=0))
    labels = np.unique(np.concatenate([cls, yt, yp]))
    t_idx = np.searchsorted(labels, yt)
    p_idx = np.searchsorted(labels, yp)
    if n_boot > 0:
        boot = _bootstrap_macro_f1(t_idx, p_idx, labels.size, n_boot, seed)
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    else:
        lo = hi = float("nan")
    prec, rec, f1s, sup = precision_recall_fscore_support(yt, yp, labels=cls, zero_division=0)
    per_class = {
        str(c): {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1s[i]),
            "support": int(sup[i]),
        }
        for i, c in enumerate(cls.tolist())
    }
    return Metrics(
        macro_f1=macro,
        macro_f1_ci_low=lo,
        macro_f1_ci_high=hi,
        accuracy=float(accuracy_score(yt, yp)),
        auroc=_auroc(yt, proba, cls),
        per_class=per_class,
        n_train=int(n_train),
        n_test=int(yt.size),
    )


def majority_baseline_f1(y_train: npt.ArrayLike, y_test: npt.ArrayLike) -> float:
    """Macro-F1 on test of always predicting the most frequent train class (ties: smallest label)."""
    labels, counts = np.unique(np.asarray(y_train), return_counts=True)
    yt = np.asarray(y_test)
    pred = np.full(yt.shape, labels[int(np.argmax(counts))], dtype=labels.dtype)
    return float(f1_score(yt, pred, average="macro", zero_division=0))


# --------------------------------------------------------------------------- probes


def fit_logistic(
    X_train: Matrix,
    y_train: npt.ArrayLike,
    X_val: Matrix,
    y_val: npt.ArrayLike,
    X_test: Matrix,
    y_test: npt.ArrayLike,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    n_splits: int = 5,
    seed: int = 0,
    scale: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-4,
    n_boot: int = 1000,
    classifier: str = "logistic",
    blas_threads: int | None = 1,
) -> ProbeResult:
    """Balanced multinomial logistic regression; C by stratified K-fold CV on train+val.

    The final model is refit on train+val with the chosen C. Test rows are used only
    for prediction. ``blas_threads`` caps BLAS threads during the fit (None: leave as
    is): lbfgs works on small dense vectors, where extra threads mostly spin and were
    measured 4x slower on a busy 2-core machine; one thread is also bit-reproducible.
    """
    Xtr, Xva, Xte = _prep(X_train), _prep(X_val), _prep(X_test)
    ytr = _check_xy("X_train", Xtr, y_train)
    yva = _check_xy("X_val", Xva, y_val)
    yte = _check_xy("X_test", Xte, y_test)
    X_fit = _stack(Xtr, Xva)
    y_fit = np.concatenate([ytr, yva])
    if not Cs:
        raise ValueError("Cs: need at least one value")
    cv = StratifiedKFold(n_splits=_n_splits(y_fit, n_splits), shuffle=True, random_state=seed)
    search = GridSearchCV(
        _logistic_pipeline(sp.issparse(X_fit), scale, seed, max_iter, tol),
        {"clf__C": [float(c) for c in Cs]},
        scoring="f1_macro",
        cv=cv,
        refit=True,
        n_jobs=None,
        error_score="raise",
    )
    with threadpool_limits(limits=blas_threads):
        model: Pipeline = fit_on_active_columns(search, X_fit, y_fit)
        pred, proba = _predict(model, Xte)
    classes = np.asarray(model.classes_)
    return ProbeResult(
        classifier=classifier,
        k=None,
        params={"C": float(search.best_params_["clf__C"]), "n_splits": int(cv.get_n_splits())},
        metrics=evaluate(yte, pred, proba, classes, seed, n_train=X_fit.shape[0], n_boot=n_boot),
        model=model,
        selected_features=None,
        test_pred=pred,
        test_proba=proba,
        classes=classes,
        selection_score=float(search.best_score_),
        val_macro_f1=float(search.best_score_),
    )


def fit_tree(
    X_train: Matrix,
    y_train: npt.ArrayLike,
    X_val: Matrix,
    y_val: npt.ArrayLike,
    X_test: Matrix,
    y_test: npt.ArrayLike,
    *,
    max_depths: Sequence[int | None] = DEFAULT_MAX_DEPTHS,
    min_samples_leafs: Sequence[int] = DEFAULT_MIN_SAMPLES_LEAF,
    seed: int = 0,
    n_boot: int = 1000,
    n_splits: int = 5,
) -> ProbeResult:
    """Balanced decision tree; grid point picked by validation macro-F1, refit on train+val.

    Ties keep the earlier grid point (shallower trees come first in the default grid).
    """
    Xtr, Xva, Xte = _prep(X_train), _prep(X_val), _prep(X_test)
    ytr = _check_xy("X_train", Xtr, y_train)
    yva = _check_xy("X_val", Xva, y_val)
    yte = _check_xy("X_test", Xte, y_test)
    best: tuple[float, int | None, int] | None = None
    for depth in max_depths:
        for leaf in min_samples_leafs:
            tree = DecisionTreeClassifier(
                max_depth=depth, min_samples_leaf=leaf, class_weight="balanced", random_state=seed
            )
            tree.fit(Xtr, ytr)
            score = float(f1_score(yva, tree.predict(Xva), average="macro", zero_division=0))
            if best is None or score > best[0]:
                best = (score, depth, leaf)
    if best is None:
        raise ValueError("max_depths/min_samples_leafs: the grid is empty")
    score, depth, leaf = best
    model = DecisionTreeClassifier(
        max_depth=depth, min_samples_leaf=leaf, class_weight="balanced", random_state=seed
    )
    X_fit = _stack(Xtr, Xva)
    y_fit = np.concatenate([ytr, yva])
    val_f1 = cv_macro_f1(model, X_fit, y_fit, n_splits=n_splits, seed=seed)
    model.fit(X_fit, y_fit)
    pred, proba = _predict(model, Xte)
    classes = np.asarray(model.classes_)
    return ProbeResult(
        classifier="tree",
        k=None,
        params={"max_depth": depth, "min_samples_leaf": int(leaf)},
        metrics=evaluate(yte, pred, proba, classes, seed, n_train=X_fit.shape[0], n_boot=n_boot),
        model=model,
        selected_features=None,
        test_pred=pred,
        test_proba=proba,
        classes=classes,
        selection_score=score,
        val_macro_f1=val_f1,
    )


def select_features(X_train: Matrix, y_train: npt.ArrayLike, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest class-mean difference on train.

    Score of a column = max over classes c of |mean(X[y == c]) - mean(X[y != c])|
    (for two classes both terms are the same difference). Highest score first;
    ties go to the lower index.
    """
    X = _prep(X_train)
    y = _check_xy("X_train", X, y_train)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
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
    score = np.abs(diff).max(axis=0)
    k_eff = min(int(k), score.size)
    return np.argsort(-score, kind="stable")[:k_eff].astype(np.int64)


def _cols(X: Matrix, idx: np.ndarray) -> Matrix:
    return X[:, idx] if sp.issparse(X) else np.asarray(X)[:, idx]


def fit_ksparse(
    X_train: Matrix,
    y_train: npt.ArrayLike,
    X_val: Matrix,
    y_val: npt.ArrayLike,
    X_test: Matrix,
    y_test: npt.ArrayLike,
    k: int,
    **logistic_kwargs: Any,
) -> ProbeResult:
    """Logistic regression on the ``k`` train-selected columns (see ``select_features``).

    Its ``val_macro_f1`` is the CV score on those columns; they were picked on train rows, some of
    which sit in the held-out folds, so it leans slightly optimistic (test rows are never involved).
    """
    Xtr, Xva, Xte = _prep(X_train), _prep(X_val), _prep(X_test)
    idx = select_features(Xtr, y_train, k)
    res = fit_logistic(
        _cols(Xtr, idx),
        y_train,
        _cols(Xva, idx),
        y_val,
        _cols(Xte, idx),
        y_test,
        classifier="ksparse",
        **logistic_kwargs,
    )
    return ProbeResult(
        classifier="ksparse",
        k=int(k),
        params={**res.params, "k_selected": int(idx.size)},
        metrics=res.metrics,
        model=res.model,
        selected_features=idx,
        test_pred=res.test_pred,
        test_proba=res.test_proba,
        classes=res.classes,
        selection_score=res.selection_score,
        val_macro_f1=res.val_macro_f1,
    )


# --------------------------------------------------------------------------- interpretation


def _py(v: Any) -> Any:
    """numpy scalar -> plain Python value (dict keys that JSON/YAML understand)."""
    return v.item() if isinstance(v, np.generic) else v


def _linear_step(model: BaseEstimator) -> LogisticRegression:
    est = model.steps[-1][1] if isinstance(model, Pipeline) else model
    if not isinstance(est, LogisticRegression):
        raise ValueError(f"result: top_latents needs a logistic probe, got {type(est).__name__}")
    return est


def top_latents(
    result: ProbeResult,
    feature_names: Sequence[str] | Mapping[int, str] | None = None,
    top: int = 10,
) -> dict[Any, list[tuple[int | str, float]]]:
    """Per class, the features with the largest weights pointing to that class.

    Weights are in the probe's (scaled) input space, so they are comparable across
    features. Indices refer to the original columns (k-sparse selection is undone);
    with ``feature_names`` the name replaces the index. Binary: the positive class
    (``classes[1]``) gets the largest positive weights, the negative class the most
    negative ones (reported with their negative sign).
    """
    clf = _linear_step(result.model)
    coef = np.asarray(clf.coef_, dtype=np.float64)
    classes = np.asarray(clf.classes_)
    sel = result.selected_features
    orig = sel if sel is not None else np.arange(coef.shape[1])

    def name(j: int) -> int | str:
        i = int(orig[j])
        return feature_names[i] if feature_names is not None else i

    def pick(w: np.ndarray, sign: float) -> list[tuple[int | str, float]]:
        order = np.argsort(-sign * w, kind="stable")
        return [(name(int(j)), float(w[j])) for j in order[:top] if sign * w[j] > 0]

    out: dict[Any, list[tuple[int | str, float]]] = {}
    if coef.shape[0] == 1:
        out[_py(classes[0])] = pick(coef[0], -1.0)
        out[_py(classes[1])] = pick(coef[0], 1.0)
    else:
        for ci, c in enumerate(classes):
            out[_py(c)] = pick(coef[ci], 1.0)
    return out


# --------------------------------------------------------------------------- persistence

_TRUSTED_ROOTS: tuple[str, ...] = ("sklearn", "numpy")


def save_model(estimator: BaseEstimator, path: str | os.PathLike[str]) -> Path:
    """Write ``estimator`` with skops; atomic (temp file in the same dir, then replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
    os.close(fd)
    try:
        sio.dump(estimator, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_model(path: str | os.PathLike[str]) -> BaseEstimator:
    """Load a skops file, trusting only sklearn/numpy types (refuses anything else)."""
    untrusted = sio.get_untrusted_types(file=path)
    bad = [t for t in untrusted if t.split(".", 1)[0] not in _TRUSTED_ROOTS]
    if bad:
        raise ValueError(f"path: {path} contains types outside sklearn/numpy: {', '.join(bad)}")
    return sio.load(path, trusted=list(untrusted))
