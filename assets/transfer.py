"""Transfer steps: ``transfer`` (train on one language, test on every language of a dataset) and, when the
config declares tasks, ``task_transfer`` (train on one dataset of a task, test on every one)."""

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, Output

from assets.emit import emit, step_asset, versions
from assets.partitions import BY_TARGET, EVERY, dataset_part, target_partitions
from assets.versions import code_version
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.tasks import build_task_transfer, task_partitions, write_task_transfer
from mosaic_dag.evaluation.transfer import build_transfer, multilingual_datasets, write_transfer
from mosaic_dag.evaluation.transfer_matrix import offdiag_mean
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


def _each_group(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                pooled: dict, data: dict, step: str,  # type: ignore[type-arg]
                groups: Callable[[ExperimentConfig], tuple[list[str], dict[str, Any]]],
                one: Callable[..., tuple[list[str], dict[str, Any]]], empty: str) -> Output:  # type: ignore[type-arg]
    """A fan-in transfer step: ``one`` group (dataset or task) after the other in one MLflow run; the handle
    lists every file written and depends on every input partition's version."""
    cfg, target = experiment.load(), parse_target(context.partition_key)
    names, metadata = groups(cfg)
    paths: list[str] = []
    with mlflow.run(context, cfg) as run:
        for name in names:
            written, shown = one(cfg, target, name, pooled, data, run)
            paths += written
            metadata |= shown
    if not names and empty:
        context.log.info(empty)
    inputs = stable_hash([versions(pooled), versions(data), code_version(step, cfg)])
    return emit(TableHandle(paths=paths, inputs=inputs), metadata, run)


def _languages(cfg: ExperimentConfig) -> tuple[list[str], dict[str, Any]]:
    names = multilingual_datasets(cfg) if cfg.transfer.enabled else []
    return names, {"datasets": MetadataValue.json(names)}


def _one_dataset(cfg: ExperimentConfig, target: TargetKey, name: str, pooled: dict, data: dict,  # type: ignore[type-arg]
                 run: TrackedRun) -> tuple[list[str], dict[str, Any]]:
    """Cross-lingual transfer of one dataset: its results rows, matrices, metadata tables and figure."""
    mine, rows = _inputs("transfer", target, [f"{name}.{lang}" for lang in cfg.dataset_languages(name)], pooled, data)
    outcome = build_transfer(cfg, target, name, {parse_dataset(k).language: h for k, h in mine.items()},
                             {parse_dataset(k).language: h for k, h in rows.items()})
    path = write_transfer(cfg, target, outcome, run.run_id)
    run.log_artifact(path, "transfer")
    metadata = _log_matrices(run, name, outcome.matrices)
    for features, matrix in outcome.matrices.items():
        metadata[f"{name}_{features}_offdiag_macro_f1"] = round(offdiag_mean(matrix), 4)
    for group, panels in transfer_groups({f"{target.key} {name} {features}": m
                                          for features, m in outcome.matrices.items()}).items():
        metadata[f"{name}_figure"] = MetadataValue.md(figure_markdown(
            lambda panels=panels, group=group: transfer_figure(panels, f"Cross-lingual transfer, {group}"),
            f"transfer {group}"))
    return [str(path), *map(str, outcome.matrix_paths)], metadata


def _tasks(cfg: ExperimentConfig) -> tuple[list[str], dict[str, Any]]:
    return list(cfg.tasks), {"tasks": MetadataValue.json(cfg.tasks)}


def _one_task(cfg: ExperimentConfig, target: TargetKey, task: str, pooled: dict, data: dict,  # type: ignore[type-arg]
              run: TrackedRun) -> tuple[list[str], dict[str, Any]]:
    """Transfer across one task's datasets: its cells with intervals, matrices and metadata tables."""
    mine, rows = _inputs("task_transfer", target, task_partitions(cfg, task), pooled, data)
    outcome = write_task_transfer(cfg, target, build_task_transfer(cfg, target, task, mine, rows))
    run.log_artifact(outcome.cells_path, "task_transfer")
    metadata = _log_matrices(run, task, outcome.matrices)
    cells = outcome.cells[["features", "train_partition", "test_partition", "macro_f1", "ci_low",
                           "ci_high", "n_train", "n_test"]]
    metadata[f"{task}_cells"] = MetadataValue.md(markdown_table(cells.round(3), max_rows=200))
    metadata[f"{task}_classes"] = MetadataValue.json(outcome.classes)
    return [str(outcome.cells_path), *map(str, outcome.matrix_paths)], metadata


_STEPS = {
    "transfer": ("Cross-lingual transfer: train on each language's train split, test on every language's test "
                 "split, for SAE, hidden-state and TF-IDF features (train-language × test-language macro-F1).",
                 _languages, _one_dataset, "no dataset with two or more languages: nothing to transfer"),
    "task_transfer": ("Transfer across datasets of one task: labels mapped onto the task's common classes, train on "
                      "each dataset partition, test on every one (SAE, hidden, TF-IDF), macro-F1 with 95% CIs.",
                      _tasks, _one_task, ""),
}


def _step(name: str, cfg: ExperimentConfig | None) -> AssetsDefinition:
    description, groups, one, empty = _STEPS[name]

    @step_asset(name, cfg, partitions_def=target_partitions, group="transfer", ins=_INS, description=description)
    def step(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
             pooled: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
        return _each_group(context, experiment, mlflow, pooled, data, name, groups, one, empty)

    return step


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    """``transfer`` always; ``task_transfer`` when the config declares tasks."""
    return [_step("transfer", cfg), *([_step("task_transfer", cfg)] if cfg is not None and cfg.tasks else [])]
