"""Sensors: register the config's partitions, add targets for new SAE releases, run the automation conditions.

Partitions are dynamic: ``mosaic run`` registers them, and so does ``config_partitions_sensor`` on each
tick. ``new_sae_release_sensor`` watches sae-lens's packaged registry and only adds target partitions for
SAEs that fit a configured model and layer; every asset carries an eager automation condition, so
``mosaic_automation`` then materializes whatever is missing or has newer upstream data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.partitions import dataset_partitions, target_partitions
from mosaic_dag.automation.releases import registry_targets
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.keys import dataset_keys, targets
from mosaic_dag.storage import stable_hash
from resources import ExperimentResource

REGISTRY_ENV = "MOSAIC_SAE_REGISTRY"
AUTOMATION_ENV = "MOSAIC_AUTOMATION"  # "off": the automation sensor starts stopped (turn it on in the UI)


def missing_partitions(instance: Any, cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """Config partitions the instance does not know yet: (targets, datasets)."""
    have_t = set(instance.get_dynamic_partitions(target_partitions.name))
    have_d = set(instance.get_dynamic_partitions(dataset_partitions.name))
    new_t = [t.key for t in targets(cfg) if t.key not in have_t]
    new_d = [d.key for d in dataset_keys(cfg) if d.key not in have_d]
    return new_t, new_d


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Adds dynamic partitions for every model/layer/SAE and dataset/language in the config.")
def config_partitions_sensor(context: SensorEvaluationContext) -> SensorResult:
    new_t, new_d = missing_partitions(context.instance, ExperimentResource().load())
    requests = []
    if new_t:
        requests.append(target_partitions.build_add_request(new_t))
    if new_d:
        requests.append(dataset_partitions.build_add_request(new_d))
    return SensorResult(dynamic_partitions_requests=requests, skip_reason=None if requests else "partitions up to date")


def make_new_sae_release_sensor(registry_path: Path | None = None, default_status: DefaultSensorStatus
                                = DefaultSensorStatus.STOPPED) -> SensorDefinition:
    """Sensor factory (the path override is for tests and for users with their own registry file)."""

    @sensor(name="new_sae_release_sensor", minimum_interval_seconds=3600, default_status=default_status,
            description="Re-reads sae-lens's pretrained_saes.yaml and adds a target partition for each new "
            "(release, sae_id) that fits a configured model and layer; automation materializes the rest.")
    def new_sae_release_sensor(context: SensorEvaluationContext) -> SensorResult:
        cfg = ExperimentResource().load()
        path = registry_path or (Path(os.environ[REGISTRY_ENV]) if os.environ.get(REGISTRY_ENV) else None)
        found = registry_targets(cfg, path)
        cursor = stable_hash(sorted(t.key for t in found))
        if cursor == context.cursor:
            return SensorResult(skip_reason="no new SAE release")
        known = set(context.instance.get_dynamic_partitions(target_partitions.name))
        new = [t.key for t in found if t.key not in known]
        return SensorResult(
            dynamic_partitions_requests=[target_partitions.build_add_request(new)] if new else [],
            skip_reason=None if new else "no SAE that fits a configured model and layer is new",
            cursor=cursor,
        )

    return new_sae_release_sensor


new_sae_release_sensor = make_new_sae_release_sensor()

automation_sensor = AutomationConditionSensorDefinition(
    "mosaic_automation", target=AssetSelection.all(),
    default_status=DefaultSensorStatus.STOPPED if os.environ.get(AUTOMATION_ENV) == "off" else DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition: materializes missing partitions and partitions "
    "whose upstream has newer data (new dataset partitions, new SAE partitions, changed sources).")
