"""Transfer evaluations, hard conditions and the report: the graph's last steps."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.partitions import multi_keys, target_dataset_partitions, target_partitions
from assets.probes import pooled_features, probes
from mosaic_dag.analysis import (
    build_conditions,
    build_report,
    build_transfer,
    conditions_file,
    multilingual_datasets,
    write_transfer,
)
from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM, parse_dataset, parse_target
from mosaic_dag.storage import write_parquet
from mosaic_dag.tables import markdown_table
from mosaic_dag.transfer import offdiag_mean
from resources import ExperimentResource, MlflowResource


@asset(
    partitions_def=target_partitions,
    deps=[pooled_features],
    group_name="transfer",
    description="Cross-lingual transfer: train on each language's train split, test on every language's test "
    "split, for SAE, hidden-state and TF-IDF features (train-language × test-language macro-F1).",
)
def transfer(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource) -> MaterializeResult:
    cfg = experiment.load()
    target = parse_target(context.partition_key)
    names = multilingual_datasets(cfg) if cfg.transfer.enabled else []
    metadata: dict = {"datasets": MetadataValue.json(names)}
    with mlflow.run(context, cfg) as run:
        for name in names:
            outcome = build_transfer(cfg, target, name)
            path = write_transfer(cfg, target, outcome, run.run_id)
            run.log_artifact(path, "transfer")
            for source, matrix in outcome.matrices.items():
                metadata[f"{name}_{source}"] = MetadataValue.md(markdown_table(matrix.round(3).reset_index(names="train \\ test")))
                run.log_metrics({f"{name}_{source}_offdiag_macro_f1": offdiag_mean(matrix)})
    if not names:
        context.log.info("no dataset with two or more languages: nothing to transfer")
    metadata["mlflow_run_id"] = run.run_id
    return MaterializeResult(metadata=metadata)


@asset(
    partitions_def=target_dataset_partitions,
    deps=[probes],
    group_name="transfer",
    description="Hard conditions (SAE-Probes style): train-size sweep, class imbalance and label noise, "
    "one curve per feature source; the test split never changes.",
)
def conditions(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource) -> MaterializeResult:
    cfg = experiment.load()
    keys = multi_keys(context)
    target, data = parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])
    if not cfg.conditions.enabled:
        return MaterializeResult(metadata={"enabled": False})
    curves = build_conditions(cfg, target, data.dataset, data.language)
    path = conditions_file(cfg, target, data.dataset, data.language)
    write_parquet(path, curves)
    with mlflow.run(context, cfg) as run:
        run.log_artifact(path, "conditions")
    show = curves[["features", "condition", "value", "macro_f1", "ci_low", "ci_high", "n_train"]] if len(curves) else curves
    return MaterializeResult(metadata={"enabled": True, "path": MetadataValue.path(str(path)), "points": len(curves),
                                       "curves": MetadataValue.md(markdown_table(show, max_rows=60)),
                                       "mlflow_run_id": run.run_id})


@asset(
    deps=[probes, transfer, conditions],
    group_name="report",
    description="report/index.md + PNG plots: macro-F1 by layer × pooling, binarization effect, SAE vs hidden vs "
    "TF-IDF with CIs, transfer heatmaps, hard-condition curves.",
)
def report(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource) -> MaterializeResult:
    cfg = experiment.load()
    rep = build_report(cfg)
    with mlflow.run(context, cfg) as run:
        run.log_artifact(rep.index, "report")
        for png in rep.pngs:
            run.log_artifact(png, "report")
    return MaterializeResult(metadata={
        "index": MetadataValue.path(str(rep.index)),
        "plots": MetadataValue.json([p.name for p in rep.pngs]),
        "skipped": MetadataValue.json(rep.skipped),
        "report": MetadataValue.md(rep.index.read_text()[:30000]),
        "mlflow_run_id": run.run_id,
    })
