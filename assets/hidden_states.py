"""The ``hidden_states`` asset: cached resid_post activations of one layer for one dataset partition."""

import os

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.datasets import dataset
from assets.partitions import target_dataset_partitions, multi_keys
from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM, parse_dataset, parse_target
from mosaic_dag.codes import check_target
from mosaic_dag.models import model_dims
from mosaic_dag.pipeline import build_hidden, models_dir
from resources import ExperimentResource, MlflowResource, ModelResource

@asset(
    partitions_def=target_dataset_partitions,
    deps=[dataset],
    group_name="features",
    description="Residual stream after block L (output of model.model.layers[L]) per token, padding-free, "
    "content-addressed on disk; one forward pass serves all configured layers.",
)
def hidden_states(
    context: AssetExecutionContext,
    experiment: ExperimentResource,
    model: ModelResource,
    mlflow: MlflowResource,
) -> MaterializeResult:
    cfg = experiment.load()
    keys = multi_keys(context)
    target = parse_target(keys[TARGET_DIM])
    data = parse_dataset(keys[DATASET_DIM])
    step = 1

    def progress(done: int, total: int) -> None:
        nonlocal step
        if done * 10 // total >= step:
            context.log.info(f"hidden states: {done}/{total} texts")
            step = done * 10 // total + 1

    result = build_hidden(
        cfg, target.model, target.layer, data.dataset, data.language,
        loader=lambda: model.get(cfg, target.model), progress=progress,
        show_bar=os.environ.get("MOSAIC_PROGRESS") == "1",
        preflight=lambda: check_target(cfg, target, *model_dims(cfg.model(target.model), models_dir(cfg))[:2]),
    )
    man = result.cache.manifest()
    stats = result.stats
    metrics = {
        "texts": float(man["texts"]),
        "tokens": float(man["tokens"]),
        "real_tokens": float(man["real_tokens"]),
        "cache_hit": 1.0 if result.hit else 0.0,
        "forward_calls": float(stats.forward_calls if stats else 0),
    }
    if stats:
        metrics |= {"seconds": stats.seconds, "tokens_per_s": stats.tokens_per_s}
    with mlflow.run(context, cfg) as run:
        run.log_params({"model": target.model, "layer": target.layer, "hook": man["hook"],
                        "max_length": man["max_length"], "dataset": data.key})
        run.log_metrics(metrics)
    context.log.info(
        f"{'cache hit' if result.hit else 'computed'}: {man['texts']} texts, {man['tokens']} tokens at {result.cache.path}"
    )
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(result.cache.path)),
            "hook": man["hook"],
            "d_model": man["d_model"],
            "texts": man["texts"],
            "tokens": man["tokens"],
            "tokens_per_s": round(stats.tokens_per_s, 1) if stats else MetadataValue.text("cached"),
            "cache_hit": result.hit,
            "forward_calls": int(metrics["forward_calls"]),
            "layers_computed": MetadataValue.json(result.layers_computed),
            "disk_mb": round(sum(s["bytes"] for s in man["shards"]) / 2**20, 2),
            "mlflow_run_id": run.run_id,
        }
    )
