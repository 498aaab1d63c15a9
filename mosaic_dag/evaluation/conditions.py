"""Hard training conditions (SAE-Probes style): few rows, class imbalance, label noise.

Each condition changes only what the probe learns from (train and validation rows); the
test split is never subsampled, reweighted or relabelled, so every point of a curve is
scored on the very same test rows. Row selections are seeded and returned sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.results import read_results_file
from mosaic_dag.evaluation.schema import SCORE_COLUMNS, score_fields
from mosaic_dag.evaluation.sweeps import SplitRows
from mosaic_dag.features.pooled import PooledResult, feature_name, read_matrix
from mosaic_dag.features.tfidf import make_vectorizer
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from mosaic_dag.paths import conditions_file
from mosaic_dag.storage import write_parquet
from mosaic_dag.data.step import read_frame
from mosaic_dag.probes.fit import FitFn, Matrix
from mosaic_dag.probes.linear import fit_logistic

__all__ = [
    "CURVE_COLUMNS",
    "build_conditions",
    "condition_curves",
    "conditions_table",
    "imbalance",
    "label_noise",
    "subsample_train",
    "write_conditions",
]

CURVE_COLUMNS: tuple[str, ...] = ("condition", "value", *SCORE_COLUMNS, "note")


def _alloc(counts: np.ndarray, n: int) -> np.ndarray:
    """Rows per class for a stratified sample of ``n``: >= 1 per class when n allows, then
    proportional by largest remainder (ties to the larger class, then the earlier one)."""
    k = counts.size
    take = np.zeros(k, dtype=np.int64)
    if n >= k:
        take[:] = 1
    left = n - int(take.sum())
    cap = counts - take
    while left > 0:
        room = cap > 0
        quota = np.where(room, counts * left / counts[room].sum(), 0.0)
        add = np.minimum(np.floor(quota).astype(np.int64), cap)
        if add.sum() == 0:
            order = np.lexsort((np.arange(k), -counts, -(quota - np.floor(quota))))
            order = [i for i in order if cap[i] > 0]
            add = np.zeros(k, dtype=np.int64)
            add[order[:left]] = 1
        take += add
        cap -= add
        left -= int(add.sum())
    return take


def subsample_train(y_train: npt.ArrayLike, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified sample of exactly ``min(n, len(y))`` rows.

    Keeps at least one row per class when ``n >= n_classes``; ``None`` keeps everything.
    """
    y = np.asarray(y_train)
    if n is None or n >= y.size:
        return np.arange(y.size, dtype=np.int64)
    if n < 1:
        raise ValueError(f"n: must be >= 1 or None, got {n}")
    _labels, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    take = _alloc(counts, int(n))
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(inv == c), size=int(t), replace=False) for c, t in enumerate(take) if t]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def imbalance(y_train: npt.ArrayLike, minority_fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices that downsample the minority class(es) to ``minority_fraction``.

    Binary: the minority class (ties: the larger label, i.e. the positive class) is cut to
    ``round(f / (1 - f) * n_majority)`` rows, so it makes up ``f`` of the kept rows.
    Multiclass: every class but the largest is cut the same way relative to the largest.
    A class already below the target keeps all its rows; every class keeps >= 1 row.
    """
    f = float(minority_fraction)
    if not 0 < f < 1:
        raise ValueError(f"minority_fraction: must be in (0, 1), got {minority_fraction}")
    y = np.asarray(y_train)
    labels, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    if labels.size < 2:
        raise ValueError("y_train: need at least two classes to imbalance")
    # the class kept whole: the largest; on a tie the smaller label (so the positive class is cut)
    largest = int(np.lexsort((np.arange(labels.size), -counts))[0])
    target = max(1, round(f / (1 - f) * counts[largest]))
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(labels.size):
        rows = np.flatnonzero(inv == c)
        if c == largest or rows.size <= target:
            keep.append(rows)
        else:
            keep.append(rng.choice(rows, size=target, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64)


def label_noise(y_train: npt.ArrayLike, rate: float, seed: int = 0) -> np.ndarray:
    """A copy of the labels with exactly ``round(rate * n)`` rows flipped to another class.

    Rows are chosen uniformly without replacement; each flipped row gets a class drawn
    uniformly from the classes present in ``y_train`` other than its own.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate: must be in [0, 1], got {rate}")
    y = np.asarray(y_train)
    out = y.copy()
    n_flip = round(rate * y.size)
    if n_flip == 0:
        return out
    labels, inv = np.unique(y, return_inverse=True)
    if labels.size < 2:
        raise ValueError("y_train: need at least two classes to flip labels")
    rng = np.random.default_rng(seed)
    rows = rng.choice(y.size, size=n_flip, replace=False)
    shift = rng.integers(1, labels.size, size=n_flip)  # 1..k-1: never the same class
    out[rows] = labels[(inv[rows] + shift) % labels.size]
    return out


# --------------------------------------------------------------------------- curves


def _rows(X: Matrix, idx: np.ndarray) -> Matrix:
    return sp.csr_matrix(X)[idx] if sp.issparse(X) else np.asarray(X)[idx]


def _size_split(n: int, n_tr: int, n_va: int) -> tuple[int, int]:
    """Share ``n`` rows between train and validation in proportion to their sizes."""
    total = n_tr + n_va
    if n >= total:
        return n_tr, n_va
    va = round(n * n_va / total) if n_va else 0
    va = min(va, n_va)
    tr = min(n - va, n_tr)
    return tr, n - tr


def condition_curves(
    X_train: Matrix,
    y_train: npt.ArrayLike,
    X_validation: Matrix,
    y_validation: npt.ArrayLike,
    X_test: Matrix,
    y_test: npt.ArrayLike,
    *,
    sizes: Sequence[int | None] = (16, 64, 256, 1024, None),
    imbalances: Sequence[float] = (0.5, 0.2, 0.1, 0.05),
    noise_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    fit: FitFn | None = None,
    seed: int = 0,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """One probe per condition point; tidy rows (condition, value, macro_f1, ci_low, ci_high, ...).

    The condition is applied to train and validation alike (the probes refit on both, so
    validation rows are training data too): ``size`` = rows learned from, shared between
    train and validation in proportion (``value`` for ``None`` is the full count);
    ``imbalance`` = minority share; ``noise`` = share of flipped labels. ``n_train`` is what
    the probe actually learned from. A point whose fit is impossible (e.g. too few rows
    per class for cross-validation) gets NaN scores and the reason in ``note``; the test
    split is the same for every point.
    """
    fit_fn: FitFn = fit if fit is not None else fit_logistic
    ytr, yva, yte = np.asarray(y_train), np.asarray(y_validation), np.asarray(y_test)
    n_tr, n_va = ytr.size, yva.size
    rows: list[dict[str, Any]] = []

    def run(condition: str, value: float, tr_idx: np.ndarray, va_idx: np.ndarray,
            y_tr: np.ndarray, y_va: np.ndarray) -> None:
        base = {"condition": condition, "value": float(value), "n_test": int(yte.size)}
        try:
            res = fit_fn(
                _rows(X_train, tr_idx), y_tr[tr_idx], _rows(X_validation, va_idx), y_va[va_idx],
                X_test, yte, seed=seed, n_boot=n_boot,
            )
        except ValueError as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            rows.append({**base, "macro_f1": np.nan, "ci_low": np.nan, "ci_high": np.nan, "accuracy": np.nan,
                         "auroc": np.nan, "n_train": int(tr_idx.size + va_idx.size), "note": first})
            return
        rows.append({**base, **score_fields(res.metrics), "note": ""})

    all_tr, all_va = np.arange(n_tr), np.arange(n_va)
    for size in sizes:
        if size is None:
            run("size", n_tr + n_va, all_tr, all_va, ytr, yva)
            continue
        if size < 1:
            raise ValueError(f"sizes: must be >= 1 or None, got {size}")
        a, b = _size_split(int(size), n_tr, n_va)
        run("size", int(size), subsample_train(ytr, a, seed), subsample_train(yva, b, seed + 1) if b else all_va[:0],
            ytr, yva)
    for frac in imbalances:
        run("imbalance", frac, imbalance(ytr, frac, seed), imbalance(yva, frac, seed + 1), ytr, yva)
    for rate in noise_rates:
        run("noise", rate, all_tr, all_va, label_noise(ytr, rate, seed), label_noise(yva, rate, seed + 1))
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


# --------------------------------------------------------------------------- the step


def build_conditions(cfg: ExperimentConfig, target: TargetKey, pooled_handle: PooledHandle,
                     data: DatasetHandle) -> pd.DataFrame:
    """Hard-condition curves for SAE, hidden and TF-IDF features on one partition (same test rows)."""
    from mosaic_dag.data.images import is_image_frame

    cc = cfg.conditions
    dataset, _, language = data.key.partition(".")
    frame = read_frame(data)
    r = SplitRows.of(frame)
    pooled = PooledResult.of(pooled_handle)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    parts = []
    for features in ("sae", "hidden") + (() if is_image_frame(frame) else ("tfidf",)):
        analyzer = ""
        if features == "tfidf":
            vec = make_vectorizer("word", language)
            texts = frame["text"].to_numpy()
            vec.fit(list(texts[np.concatenate([r.train, r.validation])]))  # never the test texts
            X = vec.transform(list(texts))
            pooling, analyzer = "", "word"
        else:
            pooling = cc.pooling if not (features == "hidden" and cc.pooling == "topn_count") else "mean"
            name = feature_name(features, pooling, cc.top_n if pooling == "topn_count" else None)
            X = read_matrix(pooled.files[name]) if name in pooled.files else None
            if X is None:
                continue
        curves = condition_curves(X[r.train], r.y(r.train), X[r.validation], r.y(r.validation), X[r.test], r.y(r.test),
                                  sizes=cc.sizes, imbalances=cc.imbalances, noise_rates=cc.noise_rates,
                                  seed=seed, n_boot=n_boot)
        parts.append(curves.assign(features=features, pooling=pooling, analyzer=analyzer, model=target.model, layer=target.layer,
                                   sae=target.sae if features == "sae" else "", dataset=dataset, language=language))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def conditions_table(cfg: ExperimentConfig, files: list[Path] | None = None) -> pd.DataFrame:
    """Hard-condition curves of ``files``, else of the config's own partitions (not an earlier config's)."""
    if files is None:
        if not cfg.conditions.enabled:
            return pd.DataFrame()
        files = [conditions_file(cfg, t, d.dataset, d.language) for t in targets(cfg) for d in dataset_keys(cfg)]
    frames = [read_results_file(p) for p in files if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_conditions(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str, curves: pd.DataFrame) -> Path:
    """The partition's hard-condition curves, where the report reads them (``paths.conditions_file``)."""
    path = conditions_file(cfg, target, dataset, language)
    write_parquet(path, curves)
    return path
