"""The ``dataset`` asset: one normalised parquet per (dataset, language) partition."""

from dagster import AssetExecutionContext, AssetsDefinition, AutomationCondition, MetadataValue

from assets.checks import DATASET_CHECKS, dataset_results
from assets.emit import emit, step_asset
from assets.partitions import dataset_partitions
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.data import datasets as ds
from mosaic_dag.data.splits import SPLITS
from mosaic_dag.keys import parse_dataset
from mosaic_dag.data.step import build_dataset, dataset_handle
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource, ModelResource

WEEKLY = "0 3 * * 1"


def build(cfg: ExperimentConfig | None) -> AssetsDefinition:
    @step_asset(
        "dataset", cfg, partitions_def=dataset_partitions, check_specs=DATASET_CHECKS, group="data",
        automation=AutomationCondition.eager() | AutomationCondition.on_cron(WEEKLY),
        description="Rows of one dataset in one language: id, text, label, label_name, language, split. "
        "Re-read every Monday 03:00 (a changed source changes its data version, and so what is stale).",
    )
    def dataset(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                model: ModelResource):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        key = parse_dataset(context.partition_key)
        with mlflow.run(context, cfg) as run:
            result = build_dataset(cfg, key.dataset, key.language, models=model.cache)
            frame = result.frame
            run.log_params({"dataset": key.dataset, "language": key.language, "content_hash": result.content_hash})
            run.log_metrics({"texts": len(frame), **{f"texts_{s}": float((frame["split"] == s).sum()) for s in SPLITS}})
        counts = ds.class_counts(frame)
        labels = sorted(frame["label_name"].unique())
        table = "| split | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n" + "\n".join(
            f"| {s} | " + " | ".join(str(counts.get(s, {}).get(lab, 0)) for lab in labels) + " |" for s in SPLITS
        )
        yield emit(dataset_handle(result, key.key), {
            "path": MetadataValue.path(str(result.path)),
            "texts": len(frame),
            "content_hash": result.content_hash,
            "class_counts": MetadataValue.md(table),
            "preview": MetadataValue.md(markdown_table(frame.head(5)[["id", "text", "label_name", "split"]])),
        }, run)
        yield from dataset_results(frame, key)

    return dataset
