"""The cross-lingual transfer step: per multilingual dataset, train on each language and test on every
language with SAE, hidden-state and TF-IDF probes; the off-diagonal cells become results rows.

    <data_dir>/results/<target>/transfer.<dataset>.parquet               off-diagonal rows of the results table
    <data_dir>/results/<target>/transfer-matrix.<dataset>.<features>.parquet
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.evaluation.schema import RESULT_COLUMNS, result_row, typed_results
from mosaic_dag.evaluation.sweeps import SplitRows
from mosaic_dag.evaluation.transfer_matrix import Split, TextSplit, tfidf_transfer_matrix, transfer_matrix
from mosaic_dag.features.pooled import PooledResult, feature_name, read_matrix
from mosaic_dag.features.pooling import binarize
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.keys import TargetKey, targets
from mosaic_dag.paths import results_root, transfer_file, transfer_matrix_file
from mosaic_dag.data.step import read_frame
from mosaic_dag.storage import atomic_path, write_parquet

__all__ = ["TransferOutcome", "build_transfer", "feature_matrix", "feature_splits", "heatmap_png",
           "multilingual_datasets", "text_splits", "transfer_matrices", "write_transfer"]


def multilingual_datasets(cfg: ExperimentConfig) -> list[str]:
    return [d.name for d in cfg.datasets if len(cfg.dataset_languages(d.name)) >= 2]


@dataclass
class TransferOutcome:
    dataset: str
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)  # features -> train x test macro-F1
    rows: pd.DataFrame | None = None
    results_path: Path | None = None
    matrix_paths: list[Path] = field(default_factory=list)


def feature_matrix(cfg: ExperimentConfig, pooled: PooledResult, features: str) -> tuple[Any, str, int | None]:
    """The pooled matrix the transfer settings (``transfer:``) name, binarized for SAE codes when asked."""
    tc = cfg.transfer
    pooling = tc.pooling if not (features == "hidden" and tc.pooling == "topn_count") else "mean"
    top_n = tc.top_n if pooling == "topn_count" else None
    name = feature_name(features, pooling, top_n)
    if name not in pooled.files:
        raise ConfigError(f"transfer.pooling {pooling!r} (top_n={top_n}) is not among classification.poolings/top_n; add it")
    X = read_matrix(pooled.files[name])
    if features == "sae" and tc.threshold is not None:
        X = binarize(X, tc.threshold, signed=pooled.signed)
    return X, pooling, top_n


def feature_splits(cfg: ExperimentConfig, pooled: Mapping[str, PooledResult], frames: Mapping[str, pd.DataFrame],
                   features: str) -> tuple[dict[str, Split], str, int | None]:
    """Per key (language or dataset partition), its train / validation / test rows of one feature matrix."""
    splits: dict[str, Split] = {}
    pooling, top_n = "", None
    for key, frame in frames.items():
        X, pooling, top_n = feature_matrix(cfg, pooled[key], features)
        r = SplitRows.of(frame)
        splits[key] = Split(X[r.train], r.y(r.train), X[r.validation], r.y(r.validation), X[r.test], r.y(r.test),
                            np.asarray(frame["id"].to_numpy()[r.test]))
    return splits, pooling, top_n


def text_splits(frames: Mapping[str, pd.DataFrame]) -> dict[str, TextSplit]:
    """Per key, its train / validation / test texts and labels (what the TF-IDF matrix fits and scores)."""
    out: dict[str, TextSplit] = {}
    for key, frame in frames.items():
        r, t = SplitRows.of(frame), frame["text"].to_numpy()
        out[key] = (list(t[r.train]), r.y(r.train), list(t[r.validation]), r.y(r.validation), list(t[r.test]), r.y(r.test))
    return out


def build_transfer(cfg: ExperimentConfig, target: TargetKey, dataset: str, pooled: dict[str, PooledHandle],
                   data: dict[str, DatasetHandle]) -> TransferOutcome:
    """Train on each language, test on every language: SAE, hidden and TF-IDF matrices.

    ``pooled`` and ``data``: the upstream handles of this dataset's partitions, by language."""
    from mosaic_dag.data.images import is_image_frame

    languages = cfg.dataset_languages(dataset)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    frames = {lang: read_frame(data[lang]) for lang in languages}
    matrices = {lang: PooledResult.of(pooled[lang]) for lang in languages}
    out = TransferOutcome(dataset)
    records: list[pd.DataFrame] = []
    for features in ("sae", "hidden"):
        splits, pooling, top_n = feature_splits(cfg, matrices, frames, features)
        res = transfer_matrix(splits, seed=seed, n_boot=n_boot)
        out.matrices[features] = res.matrix
        records.append(res.long.assign(features=features, pooling=pooling, analyzer="", top_n=top_n,
                                       threshold=cfg.transfer.threshold if features == "sae" else math.nan,
                                       validation_macro_f1=_validation_scores(res)))
    if not any(is_image_frame(f) for f in frames.values()):  # TF-IDF has no words to read in an image
        res = tfidf_transfer_matrix(text_splits(frames), cfg.transfer.tfidf, seed=seed, n_boot=n_boot)
        out.matrices["tfidf"] = res.matrix
        records.append(res.long.assign(features="tfidf", pooling="", analyzer=cfg.transfer.tfidf, top_n=None,
                                       threshold=math.nan, validation_macro_f1=_validation_scores(res)))
    long = pd.concat(records, ignore_index=True)
    long = long[long["train_language"] != long["test_language"]]  # the diagonal lives in the probes rows
    setting = np.where(long["features"] == "tfidf", long["analyzer"].astype(str), long["pooling"].astype(str))
    table = pd.DataFrame(result_row(
        model=target.model, layer=target.layer, sae=np.where(long["features"] == "sae", target.sae, ""),
        dataset=dataset, language=long["test_language"], features=long["features"], pooling=long["pooling"],
        analyzer=long["analyzer"], threshold=long["threshold"], top_n=long["top_n"], classifier="logistic", k=None,
        train_language=long["train_language"], test_language=long["test_language"],
        probe=long["features"] + "/" + setting + "/logistic", validation_macro_f1=long["validation_macro_f1"],
        macro_f1=long["macro_f1"], macro_f1_ci_low=long["ci_low"], macro_f1_ci_high=long["ci_high"],
        accuracy=long["accuracy"], auroc=long["auroc"], n_train=long["n_train"], n_test=long["n_test"],
    ))[RESULT_COLUMNS]
    out.rows = typed_results(table.reset_index(drop=True))
    return out


def _validation_scores(res: Any) -> Any:
    """Per long row, the validation score of the probe fitted on its train language."""
    return res.long["train_language"].map(lambda lang: res.probes[lang].validation_macro_f1 if lang in res.probes else math.nan)


def write_transfer(cfg: ExperimentConfig, target: TargetKey, outcome: TransferOutcome, mlflow_run_id: str) -> Path:
    rows = outcome.rows.assign(mlflow_run_id=mlflow_run_id) if outcome.rows is not None else pd.DataFrame()
    path = transfer_file(cfg, target, outcome.dataset)
    write_parquet(path, rows)
    for features, matrix in outcome.matrices.items():
        mpath = transfer_matrix_file(cfg, target, outcome.dataset, features)
        write_parquet(mpath, matrix.reset_index(names="train_language"))
        outcome.matrix_paths.append(mpath)
    outcome.results_path = path
    return path


def transfer_matrices(cfg: ExperimentConfig, files: list[Path] | None = None) -> dict[str, pd.DataFrame]:
    """Transfer matrices named '<target> <dataset> <features>': ``files`` (what the report's inputs
    name), else the saved matrices of the config's own targets and datasets (not an earlier config's)."""
    out: dict[str, pd.DataFrame] = {}
    root = results_root(cfg)
    if files is None:
        if not cfg.transfer.enabled or not root.exists():
            return out
        keys = {t.key for t in targets(cfg)}
        names = {d.name for d in cfg.datasets}
        files = [p for p in sorted(root.glob("*/transfer-matrix.*.parquet"))
                 if p.parent.name in keys and p.name.split(".")[1] in names]
    for p in sorted(Path(f) for f in files):
        _, dataset, features, _ = p.name.split(".")
        out[f"{p.parent.name} {dataset} {features}"] = pd.read_parquet(p).set_index("train_language")
    return out


# --------------------------------------------------------------------------- plotting


def heatmap_png(
    matrix_df: pd.DataFrame,
    path: str | Path,
    title: str = "macro-F1: train language (rows) -> test language (columns)",
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
) -> Path:
    """Annotated heatmap of a train x test matrix, written atomically as PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
    it is safe in worker processes and threads. NaN cells are shown as "n/a".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = matrix_df.to_numpy(dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        raise ValueError("matrix_df: is empty or all NaN; nothing to plot")
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(1.2 + 0.9 * n_cols, 1.0 + 0.8 * n_rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in matrix_df.columns])
    ax.set_yticks(range(n_rows), [str(r) for r in matrix_df.index])
    ax.set_xlabel(str(matrix_df.columns.name or "test"))
    ax.set_ylabel(str(matrix_df.index.name or "train"))
    ax.set_title(title, fontsize=9)
    mid = (vmin + vmax) / 2
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = "n/a" if np.isnan(v) else f"{v:.2f}"
            color = "black" if np.isnan(v) or v > mid else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    fig.colorbar(im, ax=ax, shrink=0.8)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target

