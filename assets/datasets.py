"""The ``dataset`` asset: one normalised parquet per (dataset, language) partition."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.partitions import dataset_partitions
from mosaic_dag import datasets as ds
from mosaic_dag.partitions import parse_dataset
from mosaic_dag.pipeline import build_dataset
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource

CHECKS = [
    AssetCheckSpec("no_empty_texts", asset="dataset", description="every text has a non-space character"),
    AssetCheckSpec("class_counts", asset="dataset", description="every class appears in train and in test"),
    AssetCheckSpec("no_shared_texts", asset="dataset", description="no text is in two splits"),
]

@asset(
    partitions_def=dataset_partitions,
    check_specs=CHECKS,
    group_name="data",
    description="Rows of one dataset in one language: id, text, label, label_name, language, split.",
)
def dataset(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource) -> MaterializeResult:
    cfg = experiment.load()
    key = parse_dataset(context.partition_key)
    result = build_dataset(cfg, key.dataset, key.language)
    frame = result.frame
    counts = ds.class_counts(frame)
    shared = ds.shared_texts(frame)
    empty = int((frame["text"].str.strip() == "").sum())
    labels = sorted(frame["label_name"].unique())
    missing = [f"{s}:{lab}" for s in ("train", "test") for lab in labels if counts.get(s, {}).get(lab, 0) == 0]
    with mlflow.run(context, cfg) as run:
        run.log_params({"dataset": key.dataset, "language": key.language, "content_hash": result.content_hash})
        run.log_metrics({"texts": len(frame), **{f"texts_{s}": float((frame["split"] == s).sum()) for s in ds.SPLITS}})
    table = "| split | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n" + "\n".join(
        f"| {s} | " + " | ".join(str(counts.get(s, {}).get(lab, 0)) for lab in labels) + " |" for s in ds.SPLITS
    )
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(result.path)),
            "texts": len(frame),
            "content_hash": result.content_hash,
            "class_counts": MetadataValue.md(table),
            "preview": MetadataValue.md(markdown_table(frame.head(5)[["id", "text", "label_name", "split"]])),
            "mlflow_run_id": run.run_id,
        },
        check_results=[
            AssetCheckResult(check_name="no_empty_texts", passed=empty == 0, metadata={"empty": empty}),
            AssetCheckResult(check_name="class_counts", passed=not missing, metadata={"missing": ", ".join(missing) or "none"}),
            AssetCheckResult(check_name="no_shared_texts", passed=shared == 0, severity=AssetCheckSeverity.WARN,
                             metadata={"shared_texts": shared}),
        ],
    )
