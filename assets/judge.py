"""The language model as a zero-/k-shot judge, paired with the selected SAE probe (opt-in: ``judge.enabled``)."""

from pathlib import Path

from dagster import AssetExecutionContext, AssetsDefinition, MetadataValue

from assets.emit import emit, input_version, step_asset, step_partition
from assets.partitions import BY_DATASET, BY_TARGET, SAME, target_dataset_partitions, upstream
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.judge import judge_partition, write_judge
from mosaic_dag.handles import DatasetHandle, SaeHandle, TableHandle
from mosaic_dag.evaluation.results import read_partition_results
from mosaic_dag.data.step import read_frame
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource


def judged(cfg: ExperimentConfig, dataset: str) -> bool:
    """Whether the judge scores this dataset (text datasets the config names, default every one)."""
    jc = cfg.judge
    return jc.enabled and cfg.dataset(dataset).modality == "text" and (jc.datasets is None or dataset in jc.datasets)


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    if cfg is None or not cfg.judge.enabled:
        return []

    @step_asset(
        "judge", cfg, partitions_def=target_dataset_partitions, group="probes",
        ins=upstream(probes=("probes", SAME), data=("dataset", BY_DATASET), sae_handle=("sae", BY_TARGET)),
        description="The LM as a zero-/k-shot judge (summed option log-probabilities; shots from train only) on the "
        "probes' test rows: macro-F1 with CI, paired SAE − judge, and seconds/LM tokens per 1,000 texts of both.",
    )
    def judge(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
              model: ModelResource, sae: SaeResource, probes: TableHandle, data: DatasetHandle,
              sae_handle: SaeHandle):  # type: ignore[no-untyped-def]
        cfg, target, key = step_partition(context, experiment)
        inputs = input_version("judge", cfg, probes, data, sae_handle)
        if not judged(cfg, key.dataset):
            return emit(TableHandle(paths=[], inputs=inputs), {"judged": False})
        results, predictions = read_partition_results(cfg, target, key.dataset, key.language, probes.paths[0])
        with mlflow.run(context, cfg) as run:
            loaded = model.load(cfg, cfg.judge.model or target.model)
            outcome = judge_partition(cfg, target, key.dataset, key.language, read_frame(data), loaded,
                                      sae.load(cfg, target, sae_handle), results, predictions, models=model.cache)
            handle = write_judge(cfg, target, key.dataset, key.language, outcome, run.run_id, inputs)
            r = outcome.row.iloc[0]
            run.log_params({"target": target.key, "dataset": key.key, "shots": cfg.judge.shots,
                            "judge_model": cfg.judge.model or target.model, "sae_probe": outcome.sae_probe})
            run.log_metrics({"judge_macro_f1": float(r["macro_f1"]), **outcome.cost}
                            | ({"sae_minus_judge_macro_f1": outcome.paired.diff,
                                "sae_minus_judge_ci_low": outcome.paired.diff_ci_low,
                                "sae_minus_judge_ci_high": outcome.paired.diff_ci_high} if outcome.paired else {}))
            run.log_artifact(Path(handle.paths[0]), "judge")
        show = outcome.row[["probe", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "n_test"]]
        return emit(handle, {
            "judged": True,
            "results_path": MetadataValue.path(handle.paths[0]),
            "judge": MetadataValue.md(markdown_table(show)),
            "sae_vs_judge": str(r["vs_judge"]) or "no SAE probe to pair with",
            "sae_probe": outcome.sae_probe,
            "cost": str(r["cost"]),
            **{k: round(float(v), 3) for k, v in outcome.cost.items()},
            "shot_ids": MetadataValue.json(outcome.shots),
        }, run)

    return [judge]
