"""Do the selected SAE probe's top latents matter to the probe and to the model? (opt-in: ``interventions.enabled``)"""

from dagster import AssetExecutionContext, AssetsDefinition, MetadataValue

from assets.emit import emit, input_version, step_asset, step_partition
from assets.partitions import BY_TARGET, POOLED_WITH_DATASET, SAME, target_dataset_partitions, upstream
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.interventions import build_interventions, write_interventions
from mosaic_dag.handles import DatasetHandle, PooledHandle, SaeHandle, TableHandle
from mosaic_dag.evaluation.results import read_partition_results
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    if cfg is None or not cfg.interventions.enabled:
        return []

    @step_asset(
        "interventions", cfg, partitions_def=target_dataset_partitions, group="probes",
        ins=upstream(probes=("probes", SAME), **POOLED_WITH_DATASET, sae_handle=("sae", BY_TARGET)),
        description="For the selected SAE probe's top latents per class: the share of test decisions that flip when the "
        "latent is removed from the pooled features, and the change of the model's output when it is removed at the "
        "SAE's layer (reconstruction + error term): log-prob of the labelled answer, else next-token KL.",
    )
    def interventions(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                      model: ModelResource, sae: SaeResource, probes: TableHandle, pooled: PooledHandle,
                      data: DatasetHandle, sae_handle: SaeHandle):  # type: ignore[no-untyped-def]
        cfg, target, key = step_partition(context, experiment)
        inputs = input_version("interventions", cfg, probes, pooled, data, sae_handle)
        results, predictions = read_partition_results(cfg, target, key.dataset, key.language, probes.paths[0])
        with mlflow.run(context, cfg) as run:
            outcome = build_interventions(cfg, target, pooled, data, results, predictions,
                                          model.load(cfg, target.model), sae.load(cfg, target, sae_handle))
            path = write_interventions(cfg, target, key.dataset, key.language, outcome.table)
            run.log_artifact(path, "interventions")
            for _, r in outcome.table.iterrows():
                run.log_metrics({f"latent_{r['latent']}_probe_flip_share": float(r["probe_flip_share"]),
                                 f"latent_{r['latent']}_model_effect": float(r["model_effect"])})
        show = outcome.table[["class", "latent", "weight", "probe_flip_share", "model_effect", "model_metric",
                              "fires_share", "verdict"]]
        return emit(TableHandle(paths=[str(path)], inputs=inputs), {
            "path": MetadataValue.path(str(path)),
            "probe": outcome.probe,
            "refit_matches_probes": outcome.refit_matches,
            "model_metric": outcome.metric,
            "interventions": MetadataValue.md(markdown_table(show.round(4))),
            # figure data: one point per latent, x = probe reliance, y = model reliance
            "figure": MetadataValue.json([{"latent": int(r["latent"]), "class": str(r["class"]),
                                           "x_probe_flip_share": round(float(r["probe_flip_share"]), 4),
                                           "y_model_effect": round(float(r["model_effect"]), 6)}
                                          for _, r in outcome.table.iterrows()]),
        }, run)

    return [interventions]
