"""Transfer evaluations, hard conditions and the report: the graph's last steps."""

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    AutomationCondition,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.partitions import BY_DATASET, BY_TARGET, EVERY, SAME, dataset_part, multi_keys, target_dataset_partitions, target_partitions
from assets.versions import code_version
from mosaic_dag.evaluation.conditions import build_conditions
from mosaic_dag.evaluation.transfer import build_transfer, multilingual_datasets, write_transfer
from mosaic_dag.report.build import build_report
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.paths import conditions_file
from mosaic_dag.report.figures import conditions_figure, transfer_figure
from mosaic_dag.handles import DatasetHandle, PooledHandle, TableHandle
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, dataset_keys, parse_dataset, parse_target, targets
from mosaic_dag.report.markdown import embedded_markdown, figure_markdown, transfer_groups
from mosaic_dag.storage import stable_hash, write_parquet
from mosaic_dag.tables import markdown_table
from mosaic_dag.evaluation.transfer_matrix import offdiag_mean
from resources import ExperimentResource, MlflowResource
from resources.mlflow import run_metadata


def _versions(handles: dict) -> list:  # type: ignore[type-arg]
    return sorted((k, h.version if h is not None else None) for k, h in handles.items())


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @asset(
        name="transfer",
        partitions_def=target_partitions,
        ins={"pooled": AssetIn("pooled_features", partition_mapping=BY_TARGET, metadata={"many": True}),
             "data": AssetIn("dataset", partition_mapping=EVERY, metadata={"many": True})},
        group_name="transfer",
        io_manager_key="handles",
        code_version=code_version("transfer", cfg),
        automation_condition=AutomationCondition.eager(),
        description="Cross-lingual transfer: train on each language's train split, test on every language's test "
        "split, for SAE, hidden-state and TF-IDF features (train-language × test-language macro-F1).",
    )
    def transfer(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                 pooled: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
        from mosaic_dag.handles import UpstreamMissing

        cfg = experiment.load()
        target = parse_target(context.partition_key)
        names = multilingual_datasets(cfg) if cfg.transfer.enabled else []
        by_dataset = {dataset_part(k): h for k, h in pooled.items()}
        metadata: dict = {"datasets": MetadataValue.json(names)}
        paths = []
        with mlflow.run(context, cfg) as run:
            for name in names:
                langs = cfg.dataset_languages(name)
                need = {lang: (by_dataset.get(f"{name}.{lang}"), data.get(f"{name}.{lang}")) for lang in langs}
                missing = [f"{name}.{lang}" for lang, (p, d) in need.items() if p is None or d is None]
                if missing:
                    raise UpstreamMissing(f"transfer {target.key!r}: pooled_features/dataset for {missing} are not "
                                          "materialized; materialize them first")
                outcome = build_transfer(cfg, target, name, {lang: p for lang, (p, _) in need.items()},
                                         {lang: d for lang, (_, d) in need.items()})
                path = write_transfer(cfg, target, outcome, run.run_id)
                paths += [str(path), *map(str, outcome.matrix_paths)]
                run.log_artifact(path, "transfer")
                for source, matrix in outcome.matrices.items():
                    metadata[f"{name}_{source}"] = MetadataValue.md(markdown_table(matrix.round(3).reset_index(names="train \\ test")))
                    run.log_metrics({f"{name}_{source}_offdiag_macro_f1": offdiag_mean(matrix)})
                    metadata[f"{name}_{source}_offdiag_macro_f1"] = round(offdiag_mean(matrix), 4)
                for group, panels in transfer_groups({f"{target.key} {name} {src}": m
                                                      for src, m in outcome.matrices.items()}).items():
                    metadata[f"{name}_figure"] = MetadataValue.md(figure_markdown(
                        lambda panels=panels, group=group: transfer_figure(panels, f"Cross-lingual transfer, {group}"),
                        f"transfer {group}"))
        if not names:
            context.log.info("no dataset with two or more languages: nothing to transfer")
        handle = TableHandle(paths=paths, inputs=stable_hash([_versions(pooled), _versions(data),
                                                              code_version("transfer", cfg)]))
        metadata |= {**run_metadata(run), "data_version": handle.version}
        return Output(handle, data_version=DataVersion(handle.version), metadata=metadata)

    task_assets = []
    if cfg is not None and cfg.tasks:
        @asset(
            name="task_transfer",
            partitions_def=target_partitions,
            ins={"pooled": AssetIn("pooled_features", partition_mapping=BY_TARGET, metadata={"many": True}),
                 "data": AssetIn("dataset", partition_mapping=EVERY, metadata={"many": True})},
            group_name="transfer",
            io_manager_key="handles",
            code_version=code_version("task_transfer", cfg),
            automation_condition=AutomationCondition.eager(),
            description="Transfer across datasets of one task: labels mapped onto the task's common classes, train on "
            "each dataset partition, test on every one (SAE, hidden, TF-IDF), macro-F1 with 95% CIs.",
        )
        def task_transfer(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                          pooled: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
            from mosaic_dag.evaluation.tasks import build_task_transfer, task_partitions, write_task_transfer
            from mosaic_dag.handles import UpstreamMissing

            cfg = experiment.load()
            target = parse_target(context.partition_key)
            by_dataset = {dataset_part(k): h for k, h in pooled.items()}
            metadata: dict = {"tasks": MetadataValue.json(cfg.tasks)}
            paths: list[str] = []
            with mlflow.run(context, cfg) as run:
                for task in cfg.tasks:
                    keys = task_partitions(cfg, task)
                    missing = [k for k in keys if by_dataset.get(k) is None or data.get(k) is None]
                    if missing:
                        raise UpstreamMissing(f"task_transfer {target.key!r}: pooled_features/dataset for {missing} "
                                              "are not materialized; materialize them first")
                    outcome = write_task_transfer(cfg, target, build_task_transfer(
                        cfg, target, task, {k: by_dataset[k] for k in keys}, {k: data[k] for k in keys}))
                    paths += [str(outcome.cells_path), *map(str, outcome.matrix_paths)]
                    run.log_artifact(outcome.cells_path, "task_transfer")
                    for source, matrix in outcome.matrices.items():
                        metadata[f"{task}_{source}"] = MetadataValue.md(
                            markdown_table(matrix.round(3).reset_index(names="train \\ test")))
                        run.log_metrics({f"{task}_{source}_offdiag_macro_f1": offdiag_mean(matrix)})
                    cells = outcome.cells[["features", "train_partition", "test_partition", "macro_f1", "ci_low",
                                           "ci_high", "n_train", "n_test"]]
                    metadata[f"{task}_cells"] = MetadataValue.md(markdown_table(cells.round(3), max_rows=200))
                    metadata[f"{task}_classes"] = MetadataValue.json(outcome.classes)
            handle = TableHandle(paths=paths, inputs=stable_hash([_versions(pooled), _versions(data),
                                                                  code_version("task_transfer", cfg)]))
            metadata |= {"mlflow_run_id": run.run_id, "data_version": handle.version}
            return Output(handle, data_version=DataVersion(handle.version), metadata=metadata)

        task_assets.append(task_transfer)

    @asset(
        name="conditions",
        partitions_def=target_dataset_partitions,
        ins={"pooled": AssetIn("pooled_features", partition_mapping=SAME),
             "data": AssetIn("dataset", partition_mapping=BY_DATASET)},
        group_name="probes",
        io_manager_key="handles",
        code_version=code_version("conditions", cfg),
        automation_condition=AutomationCondition.eager(),
        description="Hard conditions (SAE-Probes style): train-size sweep, class imbalance and label noise, "
        "one curve per feature source; the test split never changes.",
    )
    def conditions(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                   pooled: PooledHandle, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        keys = multi_keys(context)
        target, key = parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])
        inputs = stable_hash([pooled.version, data.version, code_version("conditions", cfg)])
        if not cfg.conditions.enabled:
            handle = TableHandle(paths=[], inputs=inputs)
            return Output(handle, data_version=DataVersion(handle.version), metadata={"enabled": False})
        with mlflow.run(context, cfg) as run:
            curves = build_conditions(cfg, target, pooled, data)
            path = conditions_file(cfg, target, key.dataset, key.language)
            write_parquet(path, curves)
            run.log_artifact(path, "conditions")
        show = curves[["features", "condition", "value", "macro_f1", "ci_low", "ci_high", "n_train"]] if len(curves) else curves
        handle = TableHandle(paths=[str(path)], inputs=inputs)
        return Output(handle, data_version=DataVersion(handle.version), metadata={
            "enabled": True, "path": MetadataValue.path(str(path)), "points": len(curves),
            "curves": MetadataValue.md(markdown_table(show, max_rows=60)),
            "figure": MetadataValue.md(figure_markdown(lambda: conditions_figure(curves), "hard conditions")),
            "data_version": handle.version, **run_metadata(run)})

    # opt-in steps (judge, ...) exist only when the config turns them on; the report then reads them too
    optional = [name for name, on in (("judge", cfg is not None and cfg.judge.enabled),
                                      ("task_transfer", cfg is not None and bool(cfg.tasks)),
                                      ("interventions", cfg is not None and cfg.interventions.enabled)) if on]

    @asset(
        name="report",
        ins={"probes": AssetIn("probes", partition_mapping=EVERY, metadata={"many": True}),
             "transfer": AssetIn("transfer", partition_mapping=EVERY, metadata={"many": True}),
             "conditions": AssetIn("conditions", partition_mapping=EVERY, metadata={"many": True}),
             **{name: AssetIn(name, partition_mapping=EVERY, metadata={"many": True}) for name in optional}},
        group_name="report",
        io_manager_key="handles",
        code_version=code_version("report", cfg),
        automation_condition=AutomationCondition.eager(),
        description="report/index.html (self-contained) + index.md + PNG/SVG figures of exactly the config's "
        "materialized partitions: which source wins, effect of layer, SAE, pooling and binarization, transfer "
        "heatmaps, hard conditions; the figures are embedded in this asset's `report` metadata.",
    )
    def report(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
               probes: dict, transfer: dict, conditions: dict, **extra: dict):  # type: ignore[no-untyped-def, type-arg]
        from pathlib import Path

        cfg = experiment.load()
        # only the config's own partitions: the instance keeps partitions an earlier config registered
        ours_t = {t.key for t in targets(cfg)}
        ours_d = {d.key for d in dataset_keys(cfg)}

        def current(handles: dict, multi: bool) -> dict:  # type: ignore[type-arg]
            if not multi:
                return {k: h for k, h in handles.items() if k in ours_t}
            keys = {k: target_dataset_partitions.get_partition_key_from_str(k).keys_by_dimension for k in handles}
            return {k: h for k, h in handles.items() if keys[k][TARGET_DIM] in ours_t and keys[k][DATASET_DIM] in ours_d}

        probes, conditions, transfer = current(probes, True), current(conditions, True), current(transfer, False)
        extra = {name: current(handles, name != "task_transfer") for name, handles in extra.items()}

        def files(handles: dict, pattern: str = "") -> list[Path]:  # type: ignore[type-arg]
            return [Path(p) for h in handles.values() if h is not None for p in h.paths if pattern in Path(p).name]

        missing = sorted(k for k, h in probes.items() if h is None)
        if missing:
            context.log.warning(f"report: probes not materialized for {missing}; the report leaves them out")
        with mlflow.run(context, cfg) as run:
            judged = [p for p in files(extra.get("judge", {})) if p.parent.parent.name == "results"]
            rep = build_report(cfg, results=files(probes) + files(transfer, "transfer.") + judged,
                               transfer=files(transfer, "transfer-matrix.") + files(extra.get("task_transfer", {}),
                                                                                    "transfer-matrix."),
                               conditions=files(conditions), interventions=files(extra.get("interventions", {})))
            run.log_artifact(rep.index, "report")
            if rep.html is not None:
                run.log_artifact(rep.html, "report")
            for fig in [*rep.pngs, *rep.svgs]:
                run.log_artifact(fig, "report")
        handle = TableHandle(paths=[str(rep.index)], inputs=stable_hash([_versions(probes), _versions(transfer),
                                                                         _versions(conditions)]
                                                                        + [_versions(h) for _, h in sorted(extra.items())]))
        return Output(handle, data_version=DataVersion(handle.version), metadata={
            "index": MetadataValue.path(str(rep.index)),
            "html": MetadataValue.path(str(rep.html)),
            "skipped": MetadataValue.json(rep.skipped),
            "report": MetadataValue.md(embedded_markdown(rep.index)),
            "missing_partitions": MetadataValue.json(missing),
            "data_version": handle.version,
            **run_metadata(run),
        })

    return [conditions, transfer, *task_assets, report]
