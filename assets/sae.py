"""SAE assets: the SAE of a target (trained here or from sae-lens) and its sparse codes per dataset."""


import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

from assets.partitions import (
    BY_DATASET,
    BY_TARGET,
    multi_keys,
    target_dataset_partitions,
    target_partitions,
    training_mapping,
)
from assets.sae_quality import SAE_QUALITY_CHECK, sae_quality_result, stop_on_failure
from assets.versions import code_version
from mosaic_dag.sae.build import build_sae
from mosaic_dag.sae.codes import build_codes
from mosaic_dag.sae.resolve import sae_config, training_partitions
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import DatasetHandle, HiddenHandle, SaeHandle
from mosaic_dag.lm.models import model_dims
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, parse_dataset, parse_target
from mosaic_dag.paths import models_dir
from mosaic_dag.tracking import log_curve, split_sae_metrics
from resources import ExperimentResource, MlflowResource, ModelResource
from resources.mlflow import run_metadata


def _training_keys(cfg: ExperimentConfig | None) -> list[str] | None:
    if cfg is None:
        return None
    return sorted({k for m in cfg.models for s in m.saes for k in training_partitions(cfg, s)})


def _curve_markdown(curve: list[dict[str, float]], name: str) -> str:
    from mosaic_dag.report.figures import training_curve_figure
    from mosaic_dag.report.markdown import figure_markdown

    return figure_markdown(lambda: training_curve_figure(curve, name), f"training curve of {name}")


def _sae_step(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
              hidden: dict[str, HiddenHandle | None], data: dict[str, DatasetHandle | None]) -> Iterator[Any]:
    cfg = experiment.load()
    target = parse_target(context.partition_key)
    scfg = sae_config(cfg, target)
    hf_name, d_model, _ = model_dims(cfg.model(target.model), models_dir())
    with mlflow.run(context, cfg) as run:
        result = build_sae(cfg, target, hf_name, d_model, hidden, data)
        params, metrics = split_sae_metrics(result.metrics)
        run.log_params({"origin": scfg.origin, "architecture": result.info.architecture, "width": result.info.width,
                        "release": scfg.release, "sae_id": scfg.sae_id, "hook": result.info.hook_name,
                        "cache_hit": result.cache_hit, "train_on": ",".join(training_partitions(cfg, scfg)),
                        **{f"config.{k}": v for k, v in scfg.model_dump().items() if k not in ("architecture", "width")},
                        **{f"trainer.{k}": v for k, v in params.items()}})
        run.log_metrics(metrics)
        curve = result.metrics.get("curve") or []
        log_curve(run, curve)
        if curve:
            from mosaic_dag.report.figures import NoData, training_curve_figure

            try:
                run.log_figure(training_curve_figure(curve, target.sae)[0], "sae/training_curve.png")
            except NoData:
                pass
        if handle_path := result.handle.path:
            folder = Path(handle_path)
            for name in ("cfg.json", "mosaic_training.json"):
                if (folder / name).is_file():
                    run.log_artifact(folder / name, "sae")
            if cfg.mlflow.log_sae_weights:
                for weights in sorted(folder.glob("*.safetensors")):
                    run.log_artifact(weights, "sae")
    handle = result.handle
    context.log.info(f"sae {target.sae}: {'reused' if result.cache_hit else 'trained'} "
                     f"({result.info.architecture}, {result.info.width} latents)")
    yield Output(handle, data_version=DataVersion(handle.version), metadata={
        "origin": scfg.origin,
        "path": MetadataValue.path(handle.path) if handle.path else MetadataValue.text(f"{scfg.release}/{scfg.sae_id}"),
        "architecture": result.info.architecture,
        "width": result.info.width,
        "hook": str(result.info.hook_name),
        "layer": int(target.layer),
        "cache_hit": result.cache_hit,
        "train_on": MetadataValue.json(training_partitions(cfg, scfg)),
        "neuronpedia_id": result.info.neuronpedia_id or "",
        **{k: round(float(v), 5) for k, v in (params | metrics).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("width", "layer")},
        **({"training_curve": MetadataValue.json(result.metrics["curve"]),
            "training_curve_figure": MetadataValue.md(_curve_markdown(result.metrics["curve"], target.sae))}
           if result.metrics.get("curve") else {}),
        "data_version": handle.version,
        **run_metadata(run),
    })
    yield AssetCheckResult(check_name="compatible", passed=result.mismatch is None,
                           metadata={"d_in": int(result.info.d_in), "d_model": d_model, "hook": str(result.info.hook_name)},
                           description=result.mismatch and f"{result.mismatch} (downstream steps are blocked)")


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    keys = _training_keys(cfg)
    train_ins = {} if keys == [] else {
        "hidden": AssetIn("hidden_states", partition_mapping=training_mapping(keys), metadata={"many": True}),
        "data": AssetIn("dataset", partition_mapping=training_mapping(keys), metadata={"many": True}),
    }

    common = dict(
        name="sae",
        partitions_def=target_partitions,
        check_specs=[AssetCheckSpec("compatible", asset="sae", blocking=True, partitions_def=target_partitions,
                                    description="the SAE reads this model's layer (d_in, hook, layer, model name); "
                                    "blocks every downstream step")],
        group_name="sae",
        io_manager_key="handles",
        code_version=code_version("sae", cfg),
        automation_condition=AutomationCondition.eager(),
        description="The SAE of one model/layer/SAE target: trained here with sae-lens's trainer on the TRAIN "
        "split of its `train_on` dataset partitions only (origin: train), or loaded from the sae-lens registry / "
        "a local folder and checked against the model (d_in, layer, hook, model name) before any compute.",
    )
    if train_ins:
        @asset(ins=train_ins, **common)  # type: ignore[call-overload]
        def sae(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                hidden: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
            yield from _sae_step(context, experiment, mlflow, hidden, data)
    else:
        @asset(**common)  # type: ignore[call-overload]
        def sae(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource):  # type: ignore[no-untyped-def]
            yield from _sae_step(context, experiment, mlflow, {}, {})

    @asset(
        name="sae_codes",
        partitions_def=target_dataset_partitions,
        ins={"sae": AssetIn("sae", partition_mapping=BY_TARGET),
             "hidden": AssetIn("hidden_states", partition_mapping=BY_DATASET)},
        check_specs=[SAE_QUALITY_CHECK],
        group_name="sae",
        io_manager_key="handles",
        code_version=code_version("sae_codes", cfg),
        automation_condition=AutomationCondition.eager(),
        description="SAE codes of every token, stored sparse (active latent indices + fp16 values per token).",
    )
    def sae_codes(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                  model: ModelResource, sae: SaeHandle, hidden: HiddenHandle):  # type: ignore[no-untyped-def]
        cfg = experiment.load()
        keys = multi_keys(context)
        target, data = parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])
        with mlflow.run(context, cfg) as run:
            result = build_codes(cfg, target, sae, hidden, progress=lambda d, t: context.log.info(f"encoded shard {d}/{t}"))
            man = result.manifest
            stats = {"mean_l0": man["mean_l0"], "dead_fraction": man["dead_fraction"],
                     "explained_variance": man["explained_variance"], "codes_mb": man["bytes"] / 2**20,
                     "dense_fp16_mb": man["dense_fp16_bytes"] / 2**20}
            run.log_params({"sae": target.sae, "width": man["width"], "dataset": data.key, "cache_hit": result.cache_hit})
            run.log_metrics(stats)
        quality = sae_quality_result(cfg, target, data, man, model, sae, hidden)
        ev = float(man["explained_variance"])
        yield Output(result.handle, data_version=DataVersion(result.handle.version), metadata={
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
            "data_version": result.handle.version,
            **run_metadata(run),
        })
        yield quality
        stop_on_failure(quality)

    return [sae, sae_codes]
