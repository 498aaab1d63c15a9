"""The ``sae_codes`` asset: a target's SAE codes of every token of one dataset partition, stored sparse."""

import math

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.checks import SAE_QUALITY_CHECK, sae_quality_result, stop_on_failure
from assets.emit import emit, step_asset, step_partition
from assets.partitions import BY_DATASET, BY_TARGET, target_dataset_partitions
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import HiddenHandle, SaeHandle
from mosaic_dag.sae.codes import build_codes
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @step_asset(
        "sae_codes", cfg, partitions_def=target_dataset_partitions, check_specs=[SAE_QUALITY_CHECK], group="sae",
        ins={"sae_handle": AssetIn("sae", partition_mapping=BY_TARGET),
             "hidden": AssetIn("hidden_states", partition_mapping=BY_DATASET)},
        description="SAE codes of every token, stored sparse (active latent indices + fp16 values per token).",
    )
    def sae_codes(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                  model: ModelResource, sae: SaeResource, sae_handle: SaeHandle, hidden: HiddenHandle):  # type: ignore[no-untyped-def]
        cfg, target, data = step_partition(context, experiment)
        with mlflow.run(context, cfg) as run:
            result = build_codes(cfg, target, sae_handle, hidden, progress=lambda d, t: context.log.info(f"encoded shard {d}/{t}"),
                                 saes=sae.cache)
            man = result.manifest
            stats = {"mean_l0": man["mean_l0"], "dead_fraction": man["dead_fraction"],
                     "explained_variance": man["explained_variance"], "codes_mb": man["bytes"] / 2**20,
                     "dense_fp16_mb": man["dense_fp16_bytes"] / 2**20}
            run.log_params({"sae": target.sae, "width": man["width"], "dataset": data.key, "cache_hit": result.cache_hit})
            run.log_metrics(stats)
        quality = sae_quality_result(cfg, target, data, man, model, sae, sae_handle, hidden)
        ev = float(man["explained_variance"])
        yield emit(result.handle, {
            "path": MetadataValue.path(str(result.path)),
            "cache_hit": result.cache_hit,
            "tokens": man["tokens"],
            "width": man["width"],
            "mean_l0": round(man["mean_l0"], 2),
            "dead_fraction": round(man["dead_fraction"], 4),
            "explained_variance": round(ev, 4) if math.isfinite(ev) else str(ev),
            "codes_mb": round(stats["codes_mb"], 3),
            "dense_fp16_mb": round(stats["dense_fp16_mb"], 3),
            "compression": round(man["dense_fp16_bytes"] / max(1, man["bytes"]), 1),
        }, run)
        yield quality
        stop_on_failure(quality)

    return [sae_codes]
