"""Where every artifact lives, and the keys that name cached work: the one place that knows the layout.

    <data_dir>/datasets/<dataset>/<language>.parquet                    the dataset step
    <data_dir>/hidden/<model>/L<layer>/<cache key>/                      hidden-state caches
    <data_dir>/saes/<model>/L<layer>/<sae>-<training key>/               locally trained SAEs
    <data_dir>/codes/<model>/L<layer>/<sae>/<codes key>/                 sparse codes
    <data_dir>/pooled/<model>/L<layer>/<sae|hidden>/<dataset.language>/<key>/   pooled matrices
    <data_dir>/quality/<target>/<dataset.language>-<key>.json            SAE health on task texts
    <data_dir>/results/<target>/<dataset.language>.parquet               probe rows (and transfer, judge)
    <data_dir>/predictions/<target>/<dataset.language>.parquet           test predictions of those rows
    <data_dir>/conditions|interventions/<target>/<dataset.language>.parquet
    <data_dir>/tasks/<target>/<task>.parquet                             cross-dataset transfer cells
    <data_dir>/report/                                                   figures, index.md, index.html
    $MOSAIC_CACHE/models/                                                converted model snapshots

A key hashes everything the artifact depends on, so a changed input gets a new folder and a stale
one is never read back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.keys import TargetKey
from mosaic_dag.storage import stable_hash

# bump when the layout of a hidden-state cache changes, so old caches are never read as new ones
HIDDEN_CACHE_VERSION = 1


def models_dir() -> Path:
    """Converted model snapshots are shared by every experiment on this machine ($MOSAIC_CACHE)."""
    root = os.environ.get("MOSAIC_CACHE") or Path.home() / ".cache" / "mosaic"
    return Path(root) / "models"


def dataset_file(cfg: ExperimentConfig, dataset: str, language: str) -> Path:
    return cfg.data_path / "datasets" / dataset / f"{language}.parquet"


def hidden_key(fingerprint: str, layer: int, dataset_hash: str, max_length: int) -> str:
    return stable_hash({"v": HIDDEN_CACHE_VERSION, "model": fingerprint, "layer": layer,
                        "dataset": dataset_hash, "max_length": max_length})


def hidden_dir(cfg: ExperimentConfig, model: str, layer: int, key: str) -> Path:
    return cfg.data_path / "hidden" / model / f"L{layer}" / key


def trained_sae_dir(cfg: ExperimentConfig, target: TargetKey, identity: dict[str, Any]) -> Path:
    """Folder of a locally trained SAE, keyed by everything its training read (``identity``)."""
    return cfg.data_path / "saes" / target.model / f"L{target.layer}" / f"{target.sae}-{stable_hash(identity)}"


def codes_dir(cfg: ExperimentConfig, target: TargetKey, hidden_name: str, sae_identity: str) -> Path:
    key = stable_hash({"hidden": hidden_name, "sae": sae_identity})
    return cfg.data_path / "codes" / target.model / f"L{target.layer}" / target.sae / key


def pooled_dir(cfg: ExperimentConfig, target: TargetKey, features: str, part: str, identity: dict[str, Any]) -> Path:
    """``features`` is the SAE's name for codes, ``hidden`` for hidden states; ``part`` = dataset.language."""
    return cfg.data_path / "pooled" / target.model / f"L{target.layer}" / features / part / stable_hash(identity)


def quality_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str,
                 identity: dict[str, Any]) -> Path:
    return cfg.data_path / "quality" / target.key / f"{dataset}.{language}-{stable_hash(identity)}.json"


def results_root(cfg: ExperimentConfig) -> Path:
    return cfg.data_path / "results"


def predictions_root(cfg: ExperimentConfig) -> Path:
    return cfg.data_path / "predictions"


def results_dir(cfg: ExperimentConfig, target: TargetKey) -> Path:
    return results_root(cfg) / target.key


def results_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> Path:
    return results_dir(cfg, target) / f"{dataset}.{language}.parquet"


def predictions_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> Path:
    return predictions_root(cfg) / target.key / f"{dataset}.{language}.parquet"


def judge_files(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> tuple[Path, Path]:
    """(results rows, test predictions) of one partition's judge."""
    name = f"judge.{dataset}.{language}.parquet"
    return results_dir(cfg, target) / name, predictions_root(cfg) / target.key / name


def interpretation_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> Path:
    return results_dir(cfg, target) / f"{dataset}.{language}.interpretation.html"


def transfer_file(cfg: ExperimentConfig, target: TargetKey, dataset: str) -> Path:
    return results_dir(cfg, target) / f"transfer.{dataset}.parquet"


def transfer_matrix_file(cfg: ExperimentConfig, target: TargetKey, name: str, features: str) -> Path:
    """``name`` is the dataset (across languages) or ``task-<task>`` (across datasets of one task)."""
    return results_dir(cfg, target) / f"transfer-matrix.{name}.{features}.parquet"


def task_cells_file(cfg: ExperimentConfig, target: TargetKey, task: str) -> Path:
    return cfg.data_path / "tasks" / target.key / f"{task}.parquet"


def conditions_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> Path:
    return cfg.data_path / "conditions" / target.key / f"{dataset}.{language}.parquet"


def interventions_file(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str) -> Path:
    return cfg.data_path / "interventions" / target.key / f"{dataset}.{language}.parquet"


def report_dir(cfg: ExperimentConfig) -> Path:
    return cfg.data_path / "report"
