"""Dagster Definitions for the code location (``dagster dev -w workspace.yaml``): assets, stage jobs,
sensors and resources composed for one config.

The config is read from $MOSAIC_CONFIG (the embedded demo when unset) when the code location loads:
the training partitions of local SAEs and each asset's code version come from it. Jobs are in
``mosaic_dag.automation.jobs``, sensors in ``mosaic_dag.automation.sensors``; there are no schedules:
the ``dataset`` asset is re-read every Monday by its own automation condition (``on_cron``), which
refreshes the whole graph.
"""

import os
import warnings
from pathlib import Path

from dagster import AssetsDefinition, Definitions

from assets import (
    conditions,
    datasets,
    hidden_states,
    interventions,
    judge,
    pooled_features,
    probes,
    report,
    sae,
    sae_codes,
    transfer,
)
from mosaic_dag.automation.jobs import stage_jobs
from mosaic_dag.automation.sensors import automation_sensor, config_partitions_sensor, make_new_sae_release_sensor
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import MosaicError
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource
from resources.experiment import CONFIG_ENV
from resources.handles import HandleIOManager


def build_assets(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    """Every asset of the graph for this config (``None``: a config that could not be read — the
    steps then fail with its error line)."""
    with warnings.catch_warnings():  # partitioned asset checks are a Dagster preview feature
        warnings.simplefilter("ignore")
        return [datasets.build(cfg), hidden_states.build(cfg), *sae.build(cfg), *sae_codes.build(cfg),
                *pooled_features.build(cfg), *probes.build(cfg), *judge.build(cfg), *interventions.build(cfg),
                *conditions.build(cfg), *transfer.build(cfg), *report.build(cfg)]


def resources(config_path: str | Path | None = None) -> dict[str, object]:
    """The resources every asset uses; the config is ``config_path``, else $MOSAIC_CONFIG, else the demo."""
    experiment = ExperimentResource(config_path=str(config_path or os.environ.get(CONFIG_ENV, "")))
    return {
        "experiment": experiment,
        "model": ModelResource(),
        "sae": SaeResource(),
        "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
        "handles": HandleIOManager(experiment=experiment),
    }


def build_definitions(cfg: ExperimentConfig | None, registry_path: Path | None = None,
                      resource_defs: dict[str, object] | None = None) -> Definitions:
    assets = build_assets(cfg)
    return Definitions(
        assets=assets,
        sensors=[config_partitions_sensor, make_new_sae_release_sensor(registry_path), automation_sensor],
        jobs=stage_jobs(assets),
        resources=resource_defs or resources(),
    )


def _load() -> ExperimentConfig | None:
    try:
        return ExperimentResource().load()
    except MosaicError:
        return None  # the steps report the config's error line when they run


defs = build_definitions(_load())
