"""SAE assets: the SAE of a target (trained here or from sae-lens) and its sparse codes per dataset."""

from collections.abc import Iterator

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.hidden_states import hidden_states
from assets.partitions import target_dataset_partitions, target_partitions, multi_keys
from assets.sae_quality import SAE_QUALITY_CHECK, sae_quality_result, stop_on_failure
from mosaic_dag.codes import build_codes, build_sae, sae_config
from mosaic_dag.models import model_dims
from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM, parse_dataset, parse_target
from mosaic_dag.pipeline import models_dir
from mosaic_dag.tracking import log_curve
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource


@asset(
    partitions_def=target_partitions,
    deps=[hidden_states],
    group_name="sae",
    description="The SAE of one model/layer/SAE target: trained here with sae-lens's trainer on TRAIN texts "
    "only (source: train), or loaded from the sae-lens registry / a local folder and checked against the model.",
)
def sae(context: AssetExecutionContext, experiment: ExperimentResource, sae: SaeResource,
        mlflow: MlflowResource) -> MaterializeResult:
    cfg = experiment.load()
    target = parse_target(context.partition_key)
    context.log.info(f"sae source: {sae.spec(cfg, target)}")
    hf_name, d_model, _ = model_dims(cfg.model(target.model), models_dir(cfg))
    result = build_sae(cfg, target, hf_name, d_model)
    scfg = sae_config(cfg, target)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    with mlflow.run(context, cfg) as run:
        run.log_params({"source": scfg.source, "architecture": result.info.architecture, "width": result.info.d_sae,
                        "release": scfg.release, "sae_id": scfg.sae_id, "hook": result.info.hook_name,
                        "reused": result.reused})
        run.log_metrics(metrics)
        log_curve(run, result.metrics.get("curve") or [])
    context.log.info(f"sae {target.sae}: {'reused' if result.reused else 'trained'} ({result.info.architecture}, {result.info.d_sae} latents)")
    return MaterializeResult(metadata={
        "source": scfg.source,
        "path": MetadataValue.path(str(result.path)) if result.path else MetadataValue.text(f"{scfg.release}/{scfg.sae_id}"),
        "architecture": result.info.architecture,
        "width": result.info.d_sae,
        "hook": str(result.info.hook_name),
        "layer": int(target.layer),
        "reused": result.reused,
        "neuronpedia_id": result.info.neuronpedia_id or "",
        **{k: round(v, 5) for k, v in metrics.items()},
        **({"training_curve": MetadataValue.json(result.metrics["curve"])} if result.metrics.get("curve") else {}),
        "mlflow_run_id": run.run_id,
    })


@asset(
    partitions_def=target_dataset_partitions,
    deps=[hidden_states, sae],
    check_specs=[SAE_QUALITY_CHECK],
    group_name="sae",
    description="SAE codes of every token, stored sparse (active latent indices + fp16 values per token).",
)
def sae_codes(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
              model: ModelResource) -> Iterator[MaterializeResult]:
    cfg = experiment.load()
    keys = multi_keys(context)
    target, data = parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])
    result = build_codes(cfg, target, data.dataset, data.language,
                         progress=lambda d, t: context.log.info(f"encoded shard {d}/{t}"))
    man = result.manifest
    stats = {"mean_l0": man["mean_l0"], "dead_fraction": man["dead_fraction"],
             "explained_variance": man["explained_variance"], "codes_mb": man["bytes"] / 2**20,
             "dense_fp16_mb": man["dense_fp16_bytes"] / 2**20}
    with mlflow.run(context, cfg) as run:
        run.log_params({"sae": target.sae, "width": man["width"], "dataset": data.key, "cache_hit": result.hit})
        run.log_metrics(stats)
    quality = sae_quality_result(cfg, target, data, man, model)
    yield MaterializeResult(metadata={
        "path": MetadataValue.path(str(result.path)),
        "cache_hit": result.hit,
        "tokens": man["tokens"],
        "width": man["width"],
        "mean_l0": round(man["mean_l0"], 2),
        "dead_fraction": round(man["dead_fraction"], 4),
        "explained_variance": round(man["explained_variance"], 4),
        "codes_mb": round(stats["codes_mb"], 3),
        "dense_fp16_mb": round(stats["dense_fp16_mb"], 3),
        "compression": round(man["dense_fp16_bytes"] / max(1, man["bytes"]), 1),
        "mlflow_run_id": run.run_id,
    }, check_results=[quality])
    stop_on_failure(quality)


