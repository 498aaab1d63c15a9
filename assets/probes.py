"""The ``probes`` asset: SAE vs hidden-state vs TF-IDF probes on identical test rows of one partition."""

import tempfile
from pathlib import Path

import numpy as np
from dagster import AssetExecutionContext, AssetsDefinition, MetadataValue

from assets.checks import PROBE_CHECKS, probe_results
from assets.emit import emit, input_version, pooled_step, step_partition
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.artifacts import (
    label_names,
    probe_checks,
    selected_run_log,
    top_latents_markdown,
    write_best_artifacts,
)
from mosaic_dag.evaluation.comparisons import comparison_metadata, comparison_metrics
from mosaic_dag.evaluation.results import write_results
from mosaic_dag.evaluation.selection import best_rows
from mosaic_dag.evaluation.sweeps import build_probes
from mosaic_dag.handles import DatasetHandle, PooledHandle, TableHandle
from mosaic_dag.data.step import read_frame
from mosaic_dag.probes.interpret import interpret_probes
from mosaic_dag.report.figures import sources_figure
from mosaic_dag.report.markdown import figure_markdown
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource, ModelResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @pooled_step("probes", cfg, check_specs=PROBE_CHECKS, description="Logistic, decision-tree and k-sparse probes on "
                 "SAE and hidden features, plus the TF-IDF baseline; hyper-parameters chosen on train/validation only; "
                 "macro-F1 with bootstrap 95% CI.")
    def probes(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
               model: ModelResource, pooled: PooledHandle, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg, target, key = step_partition(context, experiment)
        frame = read_frame(data)
        with mlflow.run(context, cfg) as run:
            results = build_probes(cfg, target, pooled, data, mlflow_run_id=run.run_id,
                                 progress=lambda d, t: context.log.info(f"probes {d}/{t}") if d % 10 == 0 or d == t else None)
            table = results.table
            path = write_results(cfg, target, key.dataset, key.language, table, predictions=results.predictions)
            interp = interpret_probes(cfg, target, results, frame, pooled, label_names(frame),
                                      f"{target.key} {key.key}", models=model.cache)
            interp_files = interp.save(path.parent, f"{key.dataset}.{key.language}") if interp is not None else []
            for f in interp_files:
                run.log_artifact(f, "interpretation")
            best = best_rows(table)
            cls = cfg.classification
            run.log_params({"target": target.key, "dataset": key.key, "probes": len(table), "seed": cls.seed,
                            "bootstrap": cls.bootstrap, "classifiers": ",".join(cls.classifiers),
                            "poolings": ",".join(cls.poolings), "selection": "best validation_macro_f1 per source"})
            params, metrics = selected_run_log(results, label_names(frame))
            run.log_params(params)
            run.log_metrics(metrics)
            run.log_metrics({"majority_macro_f1": results.majority_f1})
            run.log_metrics(comparison_metrics(results.comparisons))
            with tempfile.TemporaryDirectory() as tmp:
                for file, folder in write_best_artifacts(results, frame, Path(tmp)):
                    run.log_artifact(file, folder)
                run.log_artifact(path, "results")
        checks = probe_checks(results)
        show = best[["features", "pooling", "analyzer", "threshold", "top_n", "classifier", "k", "validation_macro_f1", "macro_f1",
                     "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "auroc"]]
        handle = TableHandle(paths=[str(path)], inputs=input_version("probes", cfg, pooled, data))
        # numbers, so Dagster's metadata plots compare sources (and SAE − hidden) across partitions
        numeric = {f"{row['features']}_macro_f1": round(float(row["macro_f1"]), 4) for _, row in best.iterrows()}
        numeric |= {k: round(float(v), 4) for k, v in comparison_metrics(results.comparisons).items() if np.isfinite(v)}
        figure = figure_markdown(lambda: sources_figure(table, {key.key: results.majority_f1}),
                                 f"feature sources on {key.key}")
        yield emit(handle, {
            "results_path": MetadataValue.path(str(path)),
            "probes": len(table),
            "figure": MetadataValue.md(figure),
            **numeric,
            "best": MetadataValue.md("selected on validation (validation_macro_f1); macro_f1 is its test score\n\n"
                                     + markdown_table(show)),
            **comparison_metadata(results.comparisons),
            "top_latents": MetadataValue.md(interp.markdown() if interp is not None
                                            else top_latents_markdown(results, label_names(frame))),
            "majority_macro_f1": round(checks.majority_macro_f1, 4),
            "n_test": int(table["n_test"].iloc[0]) if len(table) else 0,
            **{f"seconds_{family}": round(s, 2) for family, s in results.seconds.items()},  # where the step's time went
        }, run)
        yield from probe_results(checks)

    return [probes]
