"""Transfer across the datasets of one task: train on each dataset partition, test on every one, after
mapping each dataset's labels onto the task's common classes (``task_classes``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.evaluation.transfer import feature_splits, text_splits
from mosaic_dag.evaluation.transfer_matrix import tfidf_transfer_matrix, transfer_matrix
from mosaic_dag.features.pooled import PooledResult
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.keys import TargetKey
from mosaic_dag.paths import task_cells_file, transfer_matrix_file
from mosaic_dag.data.step import read_frame
from mosaic_dag.storage import write_parquet

__all__ = ["TaskOutcome", "build_task_transfer", "common_labels", "task_classes", "task_partitions",
           "write_task_transfer"]


def common_labels(label_names: Sequence[str], mapping: Mapping[str, str], classes: Sequence[str],
                  what: str = "dataset") -> np.ndarray:
    """Each row's label name mapped onto the task's common classes, as an index into ``classes``.

    Datasets of one task label the same thing differently (davidson's hate / offensive / neither,
    a toxicity set's toxic / not toxic); the mapping puts them in one label space so a probe fitted
    on one dataset can be scored on another."""
    names = np.asarray(label_names, dtype=object)
    unmapped = sorted(set(names.tolist()) - set(mapping))
    if unmapped:
        raise ValueError(f"{what}: task_classes has no common class for the labels {unmapped}; map every label name")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({mapping[n] for n in set(names.tolist())} - set(index))
    if unknown:
        raise ValueError(f"{what}: task_classes maps onto {unknown}, not among the task's classes {list(classes)}")
    return np.asarray([index[mapping[n]] for n in names.tolist()], dtype=np.int64)


def task_partitions(cfg: ExperimentConfig, task: str) -> list[str]:
    """The dataset partitions (``<dataset>.<language>``) of every dataset that declares ``task``."""
    return [f"{d}.{lang}" for d in cfg.tasks[task] for lang in cfg.dataset_languages(d)]


def task_classes(cfg: ExperimentConfig, task: str) -> list[str]:
    return sorted(set(cfg.dataset(cfg.tasks[task][0]).task_classes.values()))  # type: ignore[union-attr]


@dataclass
class TaskOutcome:
    """Train-dataset × test-dataset matrices of one task (rows: train partition) and their cells with CIs."""

    task: str
    classes: list[str]
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)
    cells: pd.DataFrame | None = None
    matrix_paths: list[Path] = field(default_factory=list)
    cells_path: Path | None = None


def build_task_transfer(cfg: ExperimentConfig, target: TargetKey, task: str, pooled: dict[str, PooledHandle],
                        data: dict[str, DatasetHandle]) -> TaskOutcome:
    """Train on each dataset partition of ``task``, test on every one: SAE, hidden and TF-IDF.

    Labels go through each dataset's ``task_classes`` onto the task's common classes first, so every
    partition speaks one label space; features and settings are the cross-lingual ones (``transfer:``).
    ``pooled``/``data``: the upstream handles by dataset key."""
    keys = task_partitions(cfg, task)
    classes = task_classes(cfg, task)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    frames = {k: read_frame(data[k]).copy() for k in keys}
    for k, f in frames.items():
        mapping = cfg.dataset(k.split(".")[0]).task_classes or {}
        try:
            f["label"] = common_labels(f["label_name"].astype(str).tolist(), mapping, classes, f"dataset {k}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    matrices = {k: PooledResult.of(pooled[k]) for k in keys}
    out = TaskOutcome(task, classes)
    cells: list[pd.DataFrame] = []
    for features in ("sae", "hidden"):
        splits, pooling, _ = feature_splits(cfg, matrices, frames, features)
        res = transfer_matrix(splits, seed=seed, n_boot=n_boot)
        out.matrices[features] = res.matrix
        cells.append(res.long.assign(features=features, pooling=pooling, analyzer=""))
    res = tfidf_transfer_matrix(text_splits(frames), cfg.transfer.tfidf, seed=seed, n_boot=n_boot,
                                languages={k: k.split(".", 1)[1] for k in keys})
    out.matrices["tfidf"] = res.matrix
    cells.append(res.long.assign(features="tfidf", pooling="", analyzer=cfg.transfer.tfidf))
    long = pd.concat(cells, ignore_index=True).rename(columns={"train_language": "train_partition",
                                                                "test_language": "test_partition"})
    out.cells = long.assign(model=target.model, layer=target.layer, sae=np.where(long["features"] == "sae", target.sae, ""),
                            task=task)
    for m in out.matrices.values():
        m.index.name, m.columns.name = "train dataset", "test dataset"
    return out


def write_task_transfer(cfg: ExperimentConfig, target: TargetKey, outcome: TaskOutcome) -> TaskOutcome:
    """Matrices next to the cross-lingual ones (``transfer-matrix.task-<task>.<features>``: the report draws
    them as heatmaps); the cells with their intervals under ``<data_dir>/tasks/<target>/<task>.parquet``."""
    for features, matrix in outcome.matrices.items():
        path = transfer_matrix_file(cfg, target, f"task-{outcome.task}", features)
        write_parquet(path, matrix.reset_index(names="train_language"))
        outcome.matrix_paths.append(path)
    outcome.cells_path = task_cells_file(cfg, target, outcome.task)
    write_parquet(outcome.cells_path, outcome.cells if outcome.cells is not None else pd.DataFrame())
    return outcome
