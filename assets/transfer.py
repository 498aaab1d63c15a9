"""Transfer steps: ``transfer`` (train on one language, test on every language of a dataset) and, when the
config declares tasks, ``task_transfer`` (train on one dataset of a task, test on every one)."""

from collections.abc import Mapping
from typing import Any

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.emit import emit, step_asset, versions
from assets.partitions import BY_TARGET, EVERY, dataset_part, target_partitions
from assets.versions import code_version
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.analysis import (
    build_task_transfer,
    build_transfer,
    multilingual_datasets,
    task_partitions,
    write_task_transfer,
    write_transfer,
)
from mosaic_dag.evaluation.transfer import offdiag_mean
from mosaic_dag.handles import DatasetHandle, PooledHandle, TableHandle, UpstreamMissing
from mosaic_dag.keys import TargetKey, parse_dataset, parse_target
from mosaic_dag.report.figures import transfer_figure
from mosaic_dag.report.markdown import figure_markdown, transfer_groups
from mosaic_dag.storage import stable_hash
from mosaic_dag.tables import markdown_table
from mosaic_dag.tracking import TrackedRun
from resources import ExperimentResource, MlflowResource

_INS = {"pooled": AssetIn("pooled_features", partition_mapping=BY_TARGET, metadata={"many": True}),
        "data": AssetIn("dataset", partition_mapping=EVERY, metadata={"many": True})}


def _inputs(step: str, target: TargetKey, keys: list[str], pooled: Mapping[str, PooledHandle | None],
            data: Mapping[str, DatasetHandle | None]) -> tuple[dict[str, PooledHandle], dict[str, DatasetHandle]]:
    """The pooled features and datasets of ``keys`` (dataset partitions); every one must be materialized."""
    by_dataset = {dataset_part(k): h for k, h in pooled.items()}
    missing = [k for k in keys if by_dataset.get(k) is None or data.get(k) is None]
    if missing:
        raise UpstreamMissing(f"{step} {target.key!r}: pooled_features/dataset for {missing} are not "
                              "materialized; materialize them first")
    return {k: by_dataset[k] for k in keys}, {k: data[k] for k in keys}  # type: ignore[misc]


def _log_matrices(run: TrackedRun, prefix: str, matrices: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """Each features' matrix as a metadata table; its off-diagonal mean as an MLflow metric."""
    metadata: dict[str, Any] = {}
    for features, matrix in matrices.items():
        metadata[f"{prefix}_{features}"] = MetadataValue.md(markdown_table(matrix.round(3).reset_index(names="train \\ test")))
        run.log_metrics({f"{prefix}_{features}_offdiag_macro_f1": offdiag_mean(matrix)})
    return metadata


def _input_version(pooled: Mapping[str, Any], data: Mapping[str, Any], step: str, cfg: ExperimentConfig) -> str:
    """What a fan-in transfer step's output depends on: every input partition's version and its code version."""
    return stable_hash([versions(pooled), versions(data), code_version(step, cfg)])


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @step_asset(
        "transfer", cfg, partitions_def=target_partitions, group="transfer", ins=_INS,
        description="Cross-lingual transfer: train on each language's train split, test on every language's test "
        "split, for SAE, hidden-state and TF-IDF features (train-language × test-language macro-F1).",
    )
    def transfer(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                 pooled: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
        cfg = experiment.load()
        target = parse_target(context.partition_key)
        names = multilingual_datasets(cfg) if cfg.transfer.enabled else []
        metadata: dict = {"datasets": MetadataValue.json(names)}  # type: ignore[type-arg]
        paths = []
        with mlflow.run(context, cfg) as run:
            for name in names:
                keys = [f"{name}.{lang}" for lang in cfg.dataset_languages(name)]
                mine, rows = _inputs("transfer", target, keys, pooled, data)
                outcome = build_transfer(cfg, target, name, {parse_dataset(k).language: h for k, h in mine.items()},
                                         {parse_dataset(k).language: h for k, h in rows.items()})
                path = write_transfer(cfg, target, outcome, run.run_id)
                paths += [str(path), *map(str, outcome.matrix_paths)]
                run.log_artifact(path, "transfer")
                metadata |= _log_matrices(run, name, outcome.matrices)
                for features, matrix in outcome.matrices.items():
                    metadata[f"{name}_{features}_offdiag_macro_f1"] = round(offdiag_mean(matrix), 4)
                for group, panels in transfer_groups({f"{target.key} {name} {features}": m
                                                      for features, m in outcome.matrices.items()}).items():
                    metadata[f"{name}_figure"] = MetadataValue.md(figure_markdown(
                        lambda panels=panels, group=group: transfer_figure(panels, f"Cross-lingual transfer, {group}"),
                        f"transfer {group}"))
        if not names:
            context.log.info("no dataset with two or more languages: nothing to transfer")
        handle = TableHandle(paths=paths, inputs=_input_version(pooled, data, "transfer", cfg))
        return emit(handle, metadata, run)

    if cfg is None or not cfg.tasks:
        return [transfer]

    @step_asset(
        "task_transfer", cfg, partitions_def=target_partitions, group="transfer", ins=_INS,
        description="Transfer across datasets of one task: labels mapped onto the task's common classes, train on "
        "each dataset partition, test on every one (SAE, hidden, TF-IDF), macro-F1 with 95% CIs.",
    )
    def task_transfer(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                      pooled: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
        cfg = experiment.load()
        target = parse_target(context.partition_key)
        metadata: dict = {"tasks": MetadataValue.json(cfg.tasks)}  # type: ignore[type-arg]
        paths: list[str] = []
        with mlflow.run(context, cfg) as run:
            for task in cfg.tasks:
                mine, rows = _inputs("task_transfer", target, task_partitions(cfg, task), pooled, data)
                outcome = write_task_transfer(cfg, target, build_task_transfer(cfg, target, task, mine, rows))
                paths += [str(outcome.cells_path), *map(str, outcome.matrix_paths)]
                run.log_artifact(outcome.cells_path, "task_transfer")
                metadata |= _log_matrices(run, task, outcome.matrices)
                cells = outcome.cells[["features", "train_partition", "test_partition", "macro_f1", "ci_low",
                                       "ci_high", "n_train", "n_test"]]
                metadata[f"{task}_cells"] = MetadataValue.md(markdown_table(cells.round(3), max_rows=200))
                metadata[f"{task}_classes"] = MetadataValue.json(outcome.classes)
        handle = TableHandle(paths=paths, inputs=_input_version(pooled, data, "task_transfer", cfg))
        return emit(handle, metadata, run)

    return [transfer, task_transfer]

