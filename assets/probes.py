"""Pooled feature matrices and probes: SAE vs hidden-state vs TF-IDF on identical test rows."""

import tempfile
from pathlib import Path

import numpy as np
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    AutomationCondition,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.partitions import BY_DATASET, SAME, multi_keys, target_dataset_partitions
from assets.versions import code_version
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
from mosaic_dag.features.pooled import build_pooled
from mosaic_dag.report.figures import sources_figure
from mosaic_dag.handles import CodesHandle, DatasetHandle, HiddenHandle, PooledHandle, TableHandle
from mosaic_dag.probes.interpret import interpret_probes
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, parse_dataset, parse_target
from mosaic_dag.pipeline import read_frame
from mosaic_dag.report.markdown import figure_markdown
from mosaic_dag.storage import stable_hash
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource
from resources.mlflow import run_metadata


def _keys(context: AssetExecutionContext):  # type: ignore[no-untyped-def]
    keys = multi_keys(context)
    return parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @asset(
        name="pooled_features",
        partitions_def=target_dataset_partitions,
        ins={"codes": AssetIn("sae_codes", partition_mapping=SAME),
             "hidden": AssetIn("hidden_states", partition_mapping=BY_DATASET)},
        group_name="features",
        io_manager_key="handles",
        code_version=code_version("pooled_features", cfg),
        automation_condition=AutomationCondition.eager(),
        description="Per-text features: SAE codes pooled over real tokens (sum/mean/max/last/topn_count; CSR, never "
        "densified) and the same poolings of the hidden states. BOS and padding never count.",
    )
    def pooled_features(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                        codes: CodesHandle, hidden: HiddenHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        target, data = _keys(context)
        with mlflow.run(context, cfg) as run:
            result = build_pooled(cfg, target, codes, hidden)
            sizes = {name: round(p.stat().st_size / 2**20, 3) for name, p in sorted(result.files.items())}
            run.log_params({"target": target.key, "dataset": data.key, "matrices": ",".join(sorted(result.files)),
                            "cache_hit": result.cache_hit})
            run.log_metrics({"width": float(result.width), "matrices_mb": float(sum(sizes.values()))})
        handle = result.handle
        return Output(handle, data_version=DataVersion(handle.version), metadata={
            "sae_path": MetadataValue.path(str(result.sae_dir)),
            "hidden_path": MetadataValue.path(str(result.hidden_dir)),
            "cache_hit": result.cache_hit,
            "width": result.width,
            "matrices_mb": MetadataValue.json(sizes),
            "data_version": handle.version,
            **run_metadata(run),
        })

    checks = [
        AssetCheckSpec("beats_majority", asset="probes", partitions_def=target_dataset_partitions,
                       description="best SAE macro-F1 above the majority-class baseline"),
        AssetCheckSpec("train_test_disjoint", asset="probes", partitions_def=target_dataset_partitions,
                       description="no id is both in train/validation and test"),
        AssetCheckSpec("same_test_rows", asset="probes", partitions_def=target_dataset_partitions,
                       description="every feature source scored on identical test ids"),
    ]

    @asset(
        name="probes",
        partitions_def=target_dataset_partitions,
        ins={"pooled": AssetIn("pooled_features", partition_mapping=SAME),
             "data": AssetIn("dataset", partition_mapping=BY_DATASET)},
        check_specs=checks,
        group_name="probes",
        io_manager_key="handles",
        code_version=code_version("probes", cfg),
        automation_condition=AutomationCondition.eager(),
        description="Logistic, decision-tree and k-sparse probes on SAE and hidden features, plus the TF-IDF baseline; "
        "hyper-parameters chosen on train/validation only; macro-F1 with bootstrap 95% CI.",
    )
    def probes(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
               pooled: PooledHandle, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        target, key = _keys(context)
        frame = read_frame(data)
        with mlflow.run(context, cfg) as run:
            results = build_probes(cfg, target, pooled, data, mlflow_run_id=run.run_id,
                                 progress=lambda d, t: context.log.info(f"probes {d}/{t}") if d % 10 == 0 or d == t else None)
            table = results.table
            path = write_results(cfg, target, key.dataset, key.language, table, predictions=results.predictions)
            interp = interpret_probes(cfg, target, results, frame, pooled, label_names(frame),
                                      f"{target.key} {key.key}")
            interp_files = interp.save(path.parent, f"{key.dataset}.{key.language}") if interp is not None else []
            for f in interp_files:
                run.log_artifact(f, "interpretation")
            best = best_rows(table)
            cls = cfg.classification
            run.log_params({"target": target.key, "dataset": key.key, "probes": len(table), "seed": cls.seed,
                            "bootstrap": cls.bootstrap, "classifiers": ",".join(cls.classifiers),
                            "poolings": ",".join(cls.poolings), "selection": "best val_macro_f1 per source"})
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
        show = best[["features", "pooling", "analyzer", "threshold", "top_n", "classifier", "k", "val_macro_f1", "macro_f1",
                     "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "auroc"]]
        handle = TableHandle(paths=[str(path)], inputs=stable_hash([pooled.version, data.version,
                                                                    code_version("probes", cfg)]))
        # numbers, so Dagster's metadata plots compare sources (and SAE − hidden) across partitions
        numeric = {f"{row['features']}_macro_f1": round(float(row["macro_f1"]), 4) for _, row in best.iterrows()}
        numeric |= {k: round(float(v), 4) for k, v in comparison_metrics(results.comparisons).items() if np.isfinite(v)}
        figure = figure_markdown(lambda: sources_figure(table, {key.key: results.majority_f1}),
                                 f"feature sources on {key.key}")
        yield Output(handle, data_version=DataVersion(handle.version), metadata={
            "results_path": MetadataValue.path(str(path)),
            "probes": len(table),
            "figure": MetadataValue.md(figure),
            **numeric,
            "best": MetadataValue.md("selected on validation (val_macro_f1); macro_f1 is its test score\n\n"
                                     + markdown_table(show)),
            **comparison_metadata(results.comparisons),
            "top_latents": MetadataValue.md(interp.markdown() if interp is not None
                                            else top_latents_markdown(results, label_names(frame))),
            "majority_macro_f1": round(checks.majority_macro_f1, 4),
            "n_test": int(table["n_test"].iloc[0]) if len(table) else 0,
            "data_version": handle.version,
            **run_metadata(run),
        })
        yield AssetCheckResult(check_name="beats_majority", passed=bool(checks.sae_macro_f1 > checks.majority_macro_f1),
                               metadata={"sae_macro_f1": float(np.round(checks.sae_macro_f1, 4)),
                                         "majority": round(checks.majority_macro_f1, 4)})
        yield AssetCheckResult(check_name="train_test_disjoint", passed=checks.train_test_overlap == 0,
                               metadata={"overlap": checks.train_test_overlap})
        yield AssetCheckResult(check_name="same_test_rows", passed=checks.distinct_test_sets == 1,
                               metadata={"distinct_test_sets": checks.distinct_test_sets})

    return [pooled_features, probes]
