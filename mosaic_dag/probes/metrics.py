"""Test-set metrics of a probe: macro-F1 with a seeded bootstrap CI, accuracy, AUROC, per-class scores,
and the majority-class baseline every probe is read against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

__all__ = ["Metrics", "auroc", "bootstrap_macro_f1", "evaluate", "majority_baseline_f1", "resampled_macro_f1"]


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


def bootstrap_macro_f1(
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


def auroc(y_true: np.ndarray, proba: np.ndarray | None, classes: np.ndarray) -> float:
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
        boot = bootstrap_macro_f1(t_idx, p_idx, labels.size, n_boot, seed)
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
        auroc=auroc(yt, proba, cls),
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
