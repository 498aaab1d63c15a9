"""The ``conditions`` asset: hard-condition curves (train size, imbalance, label noise) of one partition."""

from dagster import AssetExecutionContext, AssetsDefinition, MetadataValue

from assets.emit import emit, input_version, pooled_step, step_partition
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.conditions import build_conditions, write_conditions
from mosaic_dag.handles import DatasetHandle, PooledHandle, TableHandle
from mosaic_dag.report.figures import conditions_figure
from mosaic_dag.report.markdown import figure_markdown
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @pooled_step("conditions", cfg, description="Hard conditions (SAE-Probes style): train-size sweep, class "
                 "imbalance and label noise, one curve per feature source; the test split never changes.")
    def conditions(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                   pooled: PooledHandle, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg, target, key = step_partition(context, experiment)
        inputs = input_version("conditions", cfg, pooled, data)
        if not cfg.conditions.enabled:
            return emit(TableHandle(paths=[], inputs=inputs), {"enabled": False})
        with mlflow.run(context, cfg) as run:
            curves = build_conditions(cfg, target, pooled, data)
            path = write_conditions(cfg, target, key.dataset, key.language, curves)
            run.log_artifact(path, "conditions")
        show = curves[["features", "condition", "value", "macro_f1", "ci_low", "ci_high", "n_train"]] if len(curves) else curves
        return emit(TableHandle(paths=[str(path)], inputs=inputs), {
            "enabled": True, "path": MetadataValue.path(str(path)), "points": len(curves),
            "curves": MetadataValue.md(markdown_table(show, max_rows=60)),
            "figure": MetadataValue.md(figure_markdown(lambda: conditions_figure(curves), "hard conditions")),
        }, run)

    return [conditions]
