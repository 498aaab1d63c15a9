"""The ``pooled_features`` asset: per-text SAE and hidden-state features of one target and dataset."""

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.emit import emit, step_asset, step_partition
from assets.partitions import BY_DATASET, SAME, target_dataset_partitions
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.features.pooled import build_pooled
from mosaic_dag.handles import CodesHandle, HiddenHandle
from resources import ExperimentResource, MlflowResource


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    @step_asset(
        "pooled_features", cfg, partitions_def=target_dataset_partitions, group="features",
        ins={"codes": AssetIn("sae_codes", partition_mapping=SAME),
             "hidden": AssetIn("hidden_states", partition_mapping=BY_DATASET)},
        description="Per-text features: SAE codes pooled over real tokens (sum/mean/max/last/topn_count; CSR, never "
        "densified) and the same poolings of the hidden states. BOS and padding never count.",
    )
    def pooled_features(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                        codes: CodesHandle, hidden: HiddenHandle):  # type: ignore[no-untyped-def]
        cfg, target, data = step_partition(context, experiment)
        with mlflow.run(context, cfg) as run:
            result = build_pooled(cfg, target, codes, hidden)
            sizes = {name: round(p.stat().st_size / 2**20, 3) for name, p in sorted(result.files.items())}
            run.log_params({"target": target.key, "dataset": data.key, "matrices": ",".join(sorted(result.files)),
                            "cache_hit": result.cache_hit})
            run.log_metrics({"width": float(result.width), "matrices_mb": float(sum(sizes.values()))})
        return emit(result.handle, {
            "sae_path": MetadataValue.path(str(result.sae_dir)),
            "hidden_path": MetadataValue.path(str(result.hidden_dir)),
            "cache_hit": result.cache_hit,
            "width": result.width,
            "matrices_mb": MetadataValue.json(sizes),
        }, run)

    return [pooled_features]
