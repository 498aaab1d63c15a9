"""The probes step: every configured probe (features, pooling, threshold, classifier) on one partition.

SAE, hidden-state and TF-IDF probes of one partition are scored on the SAME test rows (same ids);
hyper-parameters are chosen on train/validation only (see mosaic_dag.probes.fit), and the "best"
configuration by validation score (mosaic_dag.evaluation.selection).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.comparisons import Paired, partition_comparisons, with_verdicts
from mosaic_dag.evaluation.schema import RESULT_COLUMNS, result_row, typed_results
from mosaic_dag.evaluation.selection import mark_selected
from mosaic_dag.features.pooled import PooledResult, feature_name, read_matrix
from mosaic_dag.features.pooling import binarize
from mosaic_dag.features.tfidf import fit_tfidf
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.keys import TargetKey
from mosaic_dag.data.step import read_frame
from mosaic_dag.probes.fit import ProbeResult
from mosaic_dag.probes.ksparse import fit_ksparse
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.metrics import majority_baseline_f1
from mosaic_dag.probes.tree import fit_tree

log = logging.getLogger(__name__)

__all__ = ["PartitionResults", "ProbeRun", "ProbeSpec", "SplitRows", "build_probes", "fit_spec", "predictions_frame",
           "probe_specs"]


@dataclass
class ProbeSpec:
    features: str  # sae | hidden | tfidf
    pooling: str | None  # sae / hidden only
    top_n: int | None
    threshold: float | None
    classifier: str
    k: int | None
    analyzer: str | None = None  # tfidf only: word | char

    @property
    def label(self) -> str:
        parts = [self.features, self.pooling or self.analyzer or "", f"n{self.top_n}" if self.top_n else "",
                 f"t{self.threshold}" if self.threshold is not None else "", self.classifier, f"k{self.k}" if self.k else ""]
        return "/".join(p for p in parts if p)


def probe_specs(cfg: ExperimentConfig) -> list[ProbeSpec]:
    """Every probe the config asks for, in a fixed order."""
    cls = cfg.classification
    out: list[ProbeSpec] = []

    def classifiers(features: str, pooling: str, top_n: int | None, threshold: float | None) -> None:
        for c in cls.classifiers:
            if c == "ksparse":
                out.extend(ProbeSpec(features, pooling, top_n, threshold, c, k) for k in cls.k)
            else:
                out.append(ProbeSpec(features, pooling, top_n, threshold, c, None))

    for pooling in cls.poolings:
        for top_n in (cls.top_n if pooling == "topn_count" else [None]):
            for threshold in cls.thresholds:
                classifiers("sae", pooling, top_n, threshold)
    for pooling in cls.poolings:
        if pooling != "topn_count":
            classifiers("hidden", pooling, None, None)
    out.extend(ProbeSpec("tfidf", None, None, None, "logistic", None, analyzer) for analyzer in cls.tfidf)
    return out


@dataclass
class SplitRows:
    """Row positions of each split, and their ids/labels (one frame serves every feature source)."""

    frame: pd.DataFrame
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "SplitRows":
        s = frame["split"].to_numpy()
        return cls(frame, np.flatnonzero(s == "train"), np.flatnonzero(s == "validation"), np.flatnonzero(s == "test"))

    def y(self, idx: np.ndarray) -> np.ndarray:
        return self.frame["label"].to_numpy()[idx]

    @property
    def test_ids(self) -> list[str]:
        return self.frame["id"].to_numpy()[self.test].tolist()


@dataclass
class ProbeRun:
    spec: ProbeSpec
    result: ProbeResult
    test_ids: list[str]


@dataclass
class PartitionResults:
    """``predictions``: one row per test id (``id``, ``y_true``, then one column per probe label)."""

    table: pd.DataFrame
    runs: list[ProbeRun] = field(default_factory=list)
    pooled: PooledResult | None = None
    majority_f1: float = float("nan")
    train_ids: list[str] = field(default_factory=list)
    predictions: pd.DataFrame | None = None
    comparisons: list[Paired] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # fit + score seconds per probe family


def fit_spec(spec: ProbeSpec, X: Any, rows: SplitRows, seed: int, n_boot: int, language: str) -> ProbeResult:
    tr, va, te = rows.train, rows.validation, rows.test
    if spec.features == "tfidf":
        texts = rows.frame["text"].to_numpy()
        return fit_tfidf(list(texts[tr]), rows.y(tr), list(texts[va]), rows.y(va), list(texts[te]), rows.y(te),
                         analyzer=spec.analyzer or "word", language=language, seed=seed, n_boot=n_boot)
    args = (X[tr], rows.y(tr), X[va], rows.y(va), X[te], rows.y(te))
    if spec.classifier == "logistic":
        return fit_logistic(*args, seed=seed, n_boot=n_boot)
    if spec.classifier == "tree":
        return fit_tree(*args, seed=seed, n_boot=n_boot)
    return fit_ksparse(*args, k=int(spec.k or 1), seed=seed, n_boot=n_boot)


def build_probes(
    cfg: ExperimentConfig, target: TargetKey, pooled_handle: PooledHandle, data: DatasetHandle,
    mlflow_run_id: str = "", progress: Callable[[int, int], None] | None = None,
) -> PartitionResults:
    """Fit every configured probe on one (target, dataset) partition; identical test rows for all."""
    pooled = PooledResult.of(pooled_handle)
    frame = read_frame(data)
    dataset, _, language = data.key.partition(".")
    rows = SplitRows.of(frame)
    cls = cfg.classification
    from mosaic_dag.data.images import is_image_frame

    # TF-IDF reads words: an image partition has none, so it has no TF-IDF rows (README: images)
    specs = [s for s in probe_specs(cfg) if not (s.features == "tfidf" and is_image_frame(frame))]
    cache: dict[str, Any] = {}
    runs: list[ProbeRun] = []
    records = []
    seconds: dict[str, float] = {}
    for i, spec in enumerate(specs):
        X = None
        if spec.features != "tfidf":
            name = feature_name(spec.features, spec.pooling or "", spec.top_n)
            if name not in cache:
                cache[name] = read_matrix(pooled.files[name])
            X = cache[name]
            if spec.features == "sae" and spec.threshold is not None:
                X = binarize(X, spec.threshold, signed=pooled.signed)
        if spec.k is not None and X is not None and spec.k > X.shape[1]:
            continue
        t0 = time.perf_counter()
        result = fit_spec(spec, X, rows, cls.seed, cls.bootstrap, language)
        family = "tfidf" if spec.features == "tfidf" else spec.classifier
        seconds[family] = seconds.get(family, 0.0) + time.perf_counter() - t0
        runs.append(ProbeRun(spec, result, rows.test_ids))
        m = result.metrics
        records.append(result_row(
            model=target.model, layer=target.layer, sae=target.sae if spec.features == "sae" else "",
            dataset=dataset, language=language, features=spec.features, pooling=spec.pooling or "",
            analyzer=spec.analyzer or "", threshold=spec.threshold if spec.threshold is not None else math.nan,
            top_n=spec.top_n, classifier=spec.classifier, k=spec.k, train_language=language, test_language=language,
            probe=spec.label, validation_macro_f1=result.validation_macro_f1, macro_f1=m.macro_f1, macro_f1_ci_low=m.macro_f1_ci_low,
            macro_f1_ci_high=m.macro_f1_ci_high, accuracy=m.accuracy, auroc=m.auroc, n_train=m.n_train,
            n_test=m.n_test, mlflow_run_id=mlflow_run_id,
        ))
        if progress:
            progress(i + 1, len(specs))
    table = typed_results(pd.DataFrame.from_records(records, columns=RESULT_COLUMNS))
    table = mark_selected(table)
    majority = majority_baseline_f1(rows.y(np.concatenate([rows.train, rows.validation])), rows.y(rows.test))
    train_ids = frame["id"].to_numpy()[np.concatenate([rows.train, rows.validation])].tolist()
    predictions = predictions_frame(runs, rows.test_ids, rows.y(rows.test))
    t0 = time.perf_counter()
    comparisons = partition_comparisons(runs, rows.y(rows.test), n_boot=cls.bootstrap, seed=cls.seed)
    seconds["comparisons"] = time.perf_counter() - t0
    table = with_verdicts(table, comparisons)
    return PartitionResults(table, runs, pooled, majority, train_ids, predictions, comparisons, seconds)


def predictions_frame(runs: list[ProbeRun], test_ids: list[str], y_test: np.ndarray) -> pd.DataFrame:
    """Per-row test predictions of every probe (what paired comparisons across partitions re-read)."""
    cols: dict[str, Any] = {"id": list(test_ids), "y_true": np.asarray(y_test)}
    for run in runs:
        cols[run.spec.label] = np.asarray(run.result.test_pred)
    return pd.DataFrame(cols)
