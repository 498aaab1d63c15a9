"""The ``sae`` asset: the SAE of a target, trained here or loaded from sae-lens, checked against its model."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.checks import SAE_CHECKS, compatible_result
from assets.emit import emit, step_asset
from assets.partitions import target_partitions, training_mapping
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import DatasetHandle, HiddenHandle
from mosaic_dag.keys import parse_target
from mosaic_dag.lm.models import model_dims
from mosaic_dag.paths import models_dir
from mosaic_dag.report.figures import NoData, training_curve_figure
from mosaic_dag.report.markdown import figure_markdown
from mosaic_dag.sae.build import build_sae
from mosaic_dag.sae.resolve import sae_config, training_partitions
from mosaic_dag.tracking import log_curve, split_sae_metrics
from resources import ExperimentResource, MlflowResource, SaeResource


def _training_keys(cfg: ExperimentConfig | None) -> list[str] | None:
    if cfg is None:
        return None
    return sorted({k for m in cfg.models for s in m.saes for k in training_partitions(cfg, s)})


def _curve_markdown(curve: list[dict[str, float]], name: str) -> str:
    return figure_markdown(lambda: training_curve_figure(curve, name), f"training curve of {name}")


def _sae_step(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource, sae: SaeResource,
              hidden: dict[str, HiddenHandle | None], data: dict[str, DatasetHandle | None]) -> Iterator[Any]:
    cfg = experiment.load()
    target = parse_target(context.partition_key)
    scfg = sae_config(cfg, target)
    hf_name, d_model, _ = model_dims(cfg.model(target.model), models_dir())
    with mlflow.run(context, cfg) as run:
        result = build_sae(cfg, target, hf_name, d_model, hidden, data, saes=sae.cache)
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
    context.log.info(f"sae {target.sae}: {'cache hit' if result.cache_hit else 'trained'} "
                     f"({result.info.architecture}, {result.info.width} latents)")
    yield emit(handle, {
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
    }, run)
    yield compatible_result(result, d_model)


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    keys = _training_keys(cfg)
    train_ins = {} if keys == [] else {
        "hidden": AssetIn("hidden_states", partition_mapping=training_mapping(keys), metadata={"many": True}),
        "data": AssetIn("dataset", partition_mapping=training_mapping(keys), metadata={"many": True}),
    }
    shell = step_asset(
        "sae", cfg, partitions_def=target_partitions, check_specs=SAE_CHECKS, group="sae", ins=train_ins,
        description="The SAE of one model/layer/SAE target: trained here with sae-lens's trainer on the TRAIN "
        "split of its `train_on` dataset partitions only (origin: train), or loaded from the sae-lens registry / "
        "a local folder and checked against the model (d_in, layer, hook, model name) before any compute.",
    )
    if train_ins:
        @shell
        def sae(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                sae: SaeResource, hidden: dict, data: dict):  # type: ignore[no-untyped-def, type-arg]
            yield from _sae_step(context, experiment, mlflow, sae, hidden, data)
    else:
        @shell
        def sae(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
                sae: SaeResource):  # type: ignore[no-untyped-def]
            yield from _sae_step(context, experiment, mlflow, sae, {}, {})
    return [sae]
