"""The ``dataset`` asset: one normalised parquet per (dataset, language) partition."""


from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.partitions import dataset_partitions
from assets.versions import code_version
from mosaic_dag.data import datasets as ds
from mosaic_dag.data.leakage import shared_texts
from mosaic_dag.data.splits import SPLITS
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.keys import parse_dataset
from mosaic_dag.data.step import build_dataset, dataset_handle
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource
from resources.mlflow import run_metadata

WEEKLY = "0 3 * * 1"


def build(cfg: ExperimentConfig | None) -> AssetsDefinition:
    checks = [
        AssetCheckSpec("no_empty_texts", asset="dataset", description="every text has a non-space character",
                       partitions_def=dataset_partitions),
        AssetCheckSpec("class_counts", asset="dataset", description="every class appears in train and in test",
                       partitions_def=dataset_partitions),
        AssetCheckSpec("no_shared_texts", asset="dataset", blocking=True, partitions_def=dataset_partitions,
                       description="no text is in two splits (leakage): blocks every downstream step"),
    ]

    @asset(
        name="dataset",
        partitions_def=dataset_partitions,
        check_specs=checks,
        group_name="data",
        io_manager_key="handles",
        code_version=code_version("dataset", cfg),
        automation_condition=AutomationCondition.eager() | AutomationCondition.on_cron(WEEKLY),
        description="Rows of one dataset in one language: id, text, label, label_name, language, split. "
        "Re-read every Monday 03:00 (a changed source changes its data version, and so what is stale).",
    )
    def dataset(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        key = parse_dataset(context.partition_key)
        with mlflow.run(context, cfg) as run:
            result = build_dataset(cfg, key.dataset, key.language)
            handle = dataset_handle(result, key.key)
            frame = result.frame
            run.log_params({"dataset": key.dataset, "language": key.language, "content_hash": result.content_hash})
            run.log_metrics({"texts": len(frame), **{f"texts_{s}": float((frame["split"] == s).sum()) for s in SPLITS}})
        counts = ds.class_counts(frame)
        shared = shared_texts(frame)
        empty = int((frame["text"].str.strip() == "").sum())
        labels = sorted(frame["label_name"].unique())
        missing = [f"{s}:{lab}" for s in ("train", "test") for lab in labels if counts.get(s, {}).get(lab, 0) == 0]
        table = "| split | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n" + "\n".join(
            f"| {s} | " + " | ".join(str(counts.get(s, {}).get(lab, 0)) for lab in labels) + " |" for s in SPLITS
        )
        yield Output(
            handle,
            data_version=DataVersion(handle.version),
            metadata={
                "path": MetadataValue.path(str(result.path)),
                "texts": len(frame),
                "content_hash": result.content_hash,
                "data_version": handle.version,
                "class_counts": MetadataValue.md(table),
                "preview": MetadataValue.md(markdown_table(frame.head(5)[["id", "text", "label_name", "split"]])),
                **run_metadata(run),
            },
        )
        yield AssetCheckResult(check_name="no_empty_texts", passed=empty == 0, metadata={"empty": empty})
        yield AssetCheckResult(check_name="class_counts", passed=not missing,
                               metadata={"missing": ", ".join(missing) or "none"})
        yield AssetCheckResult(check_name="no_shared_texts", passed=shared == 0, severity=AssetCheckSeverity.ERROR,
                               metadata={"shared_texts": shared},
                               description=None if shared == 0 else
                               f"dataset {key.key!r}: {shared} texts are in two splits; downstream steps are blocked")

    return dataset
