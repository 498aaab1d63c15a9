"""Dagster Definitions for the code location (``dagster dev -w workspace.yaml``).

The config is read from $MOSAIC_CONFIG (the embedded demo when unset). Partitions are dynamic:
``mosaic run`` registers them, and so does ``config_partitions_sensor`` on each tick, so the UI
shows a new model, layer, SAE or language as soon as the config names it.
"""


import os

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    Definitions,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from assets.datasets import dataset
from assets.hidden_states import hidden_states
from assets.partitions import dataset_partitions, target_partitions
from mosaic_dag.config import load_config
from mosaic_dag.partitions import dataset_keys, targets
from resources import ExperimentResource, MlflowResource, ModelResource
from resources.experiment import CONFIG_ENV

ALL_ASSETS = [dataset, hidden_states]


def missing_partitions(instance, cfg) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """Config partitions the instance does not know yet: (targets, datasets)."""
    have_t = set(instance.get_dynamic_partitions(target_partitions.name))
    have_d = set(instance.get_dynamic_partitions(dataset_partitions.name))
    new_t = [t.key for t in targets(cfg) if t.key not in have_t]
    new_d = [d.key for d in dataset_keys(cfg) if d.key not in have_d]
    return new_t, new_d


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Adds dynamic partitions for every model/layer/SAE and dataset/language in the config.")
def config_partitions_sensor(context: SensorEvaluationContext) -> SensorResult:
    cfg = load_config(os.environ.get(CONFIG_ENV) or None)
    new_t, new_d = missing_partitions(context.instance, cfg)
    requests = []
    if new_t:
        requests.append(target_partitions.build_add_request(new_t))
    if new_d:
        requests.append(dataset_partitions.build_add_request(new_d))
    return SensorResult(dynamic_partitions_requests=requests, skip_reason=None if requests else "partitions up to date")


def resources() -> dict[str, object]:
    return {
        "experiment": ExperimentResource(config_path=os.environ.get(CONFIG_ENV, "")),
        "model": ModelResource(),
        "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
    }


features_job = define_asset_job("features", selection=AssetSelection.assets(hidden_states))

defs = Definitions(
    assets=ALL_ASSETS,
    sensors=[config_partitions_sensor],
    jobs=[features_job],
    resources=resources(),
)
