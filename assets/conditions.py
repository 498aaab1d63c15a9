"""The ``conditions`` asset: hard-condition curves (train size, imbalance, label noise) of one partition."""

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.emit import emit, step_asset, target_dataset
from assets.partitions import BY_DATASET, SAME, target_dataset_partitions
from assets.versions import code_version
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.analysis import build_conditions
from mosaic_dag.handles import DatasetHandle, PooledHandle, TableHandle
from mosaic_dag.paths import conditions_file
from mosaic_dag.report.figures import conditions_figure
from mosaic_dag.report.markdown import figure_markdown
from mosaic_dag.storage import stable_hash, write_parquet
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @step_asset(
        "conditions", cfg, partitions_def=target_dataset_partitions, group="probes",
        ins={"pooled": AssetIn("pooled_features", partition_mapping=SAME),
             "data": AssetIn("dataset", partition_mapping=BY_DATASET)},
        description="Hard conditions (SAE-Probes style): train-size sweep, class imbalance and label noise, "
        "one curve per feature source; the test split never changes.",
    )
    def conditions(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                   pooled: PooledHandle, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        target, key = target_dataset(context)
        inputs = stable_hash([pooled.version, data.version, code_version("conditions", cfg)])
        if not cfg.conditions.enabled:
            return emit(TableHandle(paths=[], inputs=inputs), {"enabled": False})
        with mlflow.run(context, cfg) as run:
            curves = build_conditions(cfg, target, pooled, data)
            path = conditions_file(cfg, target, key.dataset, key.language)
            write_parquet(path, curves)
            run.log_artifact(path, "conditions")
        show = curves[["features", "condition", "value", "macro_f1", "ci_low", "ci_high", "n_train"]] if len(curves) else curves
        return emit(TableHandle(paths=[str(path)], inputs=inputs), {
            "enabled": True, "path": MetadataValue.path(str(path)), "points": len(curves),
            "curves": MetadataValue.md(markdown_table(show, max_rows=60)),
            "figure": MetadataValue.md(figure_markdown(lambda: conditions_figure(curves), "hard conditions")),
        }, run)

    return [conditions]
