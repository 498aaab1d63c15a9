"""The ``hidden_states`` asset: resid_post activations of every configured (model, layer) for one dataset."""


import os

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.emit import emit, step_asset
from assets.partitions import SAME, dataset_partitions
from mosaic_dag.sae.resolve import check_target
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import DatasetHandle
from mosaic_dag.lm.models import model_dims
from mosaic_dag.keys import targets
from mosaic_dag.paths import models_dir
from mosaic_dag.lm.hidden_states import build_hidden_states, hidden_cache
from mosaic_dag.tables import markdown_table
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource


def build(cfg: ExperimentConfig | None) -> AssetsDefinition:
    @step_asset(
        "hidden_states", cfg, partitions_def=dataset_partitions, group="features",
        ins={"data": AssetIn("dataset", partition_mapping=SAME)},
        description="Residual stream after block L (output of model.model.layers[L]) per token, padding-free, "
        "content-addressed on disk, for every configured model and layer: one forward pass per model serves "
        "all its layers. Registry/local SAEs are checked against each model before its forward pass.",
    )
    def hidden_states(context: AssetExecutionContext, experiment: ExperimentResource, model: ModelResource,
                      sae: SaeResource, mlflow: MlflowResource, data: DatasetHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        step = 1

        def progress(done: int, total: int) -> None:
            nonlocal step
            if done * 10 // total >= step:
                context.log.info(f"hidden states: {done}/{total} texts")
                step = done * 10 // total + 1

        def preflight(name: str) -> None:
            hf_name, d_model, _ = model_dims(cfg.model(name), models_dir())
            for target in targets(cfg):
                if target.model == name:
                    check_target(cfg, target, hf_name, d_model, saes=sae.cache)

        with mlflow.run(context, cfg) as run:
            result = build_hidden_states(cfg, data, loader=model.loader(cfg), progress=progress,
                                         show_bar=os.environ.get("MOSAIC_PROGRESS") == "1", preflight=preflight)
            rows = []
            for m in result.models:
                for layer in cfg.model(m.model).layers:
                    man = hidden_cache(result.handle, m.model, layer).manifest()
                    rows.append({"model": m.model, "layer": layer, "hook": man["hook"], "texts": man["texts"],
                                 "tokens": man["tokens"], "cache_hit": layer not in m.layers_computed,
                                 "disk_mb": round(sum(s["bytes"] for s in man["shards"]) / 2**20, 2)})
            stats = [m.stats for m in result.models if m.stats]
            metrics = {"forward_calls": float(result.forward_calls), "cache_hit": float(result.cache_hit),
                       "texts": float(rows[0]["texts"]) if rows else 0.0,
                       "tokens": float(rows[0]["tokens"]) if rows else 0.0}
            if stats:
                metrics |= {"seconds": sum(s.seconds for s in stats),
                            "tokens_per_s": sum(s.tokens for s in stats) / max(1e-9, sum(s.seconds for s in stats))}
            run.log_params({"dataset": data.key, "sites": ",".join(sorted(result.handle.caches))})
            run.log_metrics(metrics)
        context.log.info(f"{'cache hit' if result.cache_hit else 'computed'}: {len(rows)} caches for {data.key}")
        return emit(result.handle, {
            "caches": MetadataValue.md(markdown_table(pd.DataFrame(rows))),
            "sites": MetadataValue.json(sorted(result.handle.caches)),
            "paths": MetadataValue.json(dict(sorted(result.handle.caches.items()))),
            "texts": int(rows[0]["texts"]) if rows else 0,
            "tokens": int(rows[0]["tokens"]) if rows else 0,
            "cache_hit": result.cache_hit,
            "forward_calls": int(result.forward_calls),
            "layers_computed": MetadataValue.json({m.model: m.layers_computed for m in result.models}),
            "tokens_per_s": round(metrics.get("tokens_per_s", 0.0), 1),
        }, run)

    return hidden_states
