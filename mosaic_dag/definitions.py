"""Dagster Definitions for the code location (``dagster dev -w workspace.yaml``).

The config is read from $MOSAIC_CONFIG (the embedded demo when unset). Partitions are dynamic:
``mosaic run`` registers them, and so does ``config_partitions_sensor`` on each tick, so the UI
shows a new model, layer, SAE or language as soon as the config names it.
``new_sae_release_sensor`` watches sae-lens's packaged registry for SAEs that fit a configured
model and layer, and ``weekly_refresh`` re-materializes everything (cache hits make that cheap).
"""

import os
import re
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    MultiPartitionKey,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    schedule,
    sensor,
)

from assets.analysis import conditions, report, transfer
from assets.datasets import dataset
from assets.hidden_states import hidden_states
from assets.partitions import dataset_partitions, target_partitions
from assets.probes import pooled_features, probes
from assets.sae import sae, sae_codes
from mosaic_dag.config import ExperimentConfig, load_config
from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM, Target, dataset_keys, targets
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource
from resources.experiment import CONFIG_ENV

ALL_ASSETS = [dataset, hidden_states, sae, sae_codes, pooled_features, probes, conditions, transfer, report]
REGISTRY_ENV = "MOSAIC_SAE_REGISTRY"
MAX_REGISTRY_WIDTH = 65536

dataset_job = define_asset_job("datasets", selection=AssetSelection.assets(dataset))
sae_job = define_asset_job("saes", selection=AssetSelection.assets(sae))
features_job = define_asset_job(
    "features", selection=AssetSelection.assets(hidden_states, sae_codes, pooled_features, probes, conditions)
)
transfer_job = define_asset_job("transfer_job", selection=AssetSelection.assets(transfer))
report_job = define_asset_job("report_job", selection=AssetSelection.assets(report))


def _config() -> ExperimentConfig:
    return load_config(os.environ.get(CONFIG_ENV) or None)


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
    new_t, new_d = missing_partitions(context.instance, _config())
    requests = []
    if new_t:
        requests.append(target_partitions.build_add_request(new_t))
    if new_d:
        requests.append(dataset_partitions.build_add_request(new_d))
    return SensorResult(dynamic_partitions_requests=requests, skip_reason=None if requests else "partitions up to date")


def _width(sae_id: str) -> int:
    m = re.search(r"width_(\d+)([km]?)", sae_id, flags=re.IGNORECASE)
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def registry_targets(cfg: ExperimentConfig, registry_path: Path | None = None,
                     max_width: int = MAX_REGISTRY_WIDTH) -> list[Target]:
    """Targets for registry SAEs that fit a configured model and layer (resid_post, width <= max_width)."""
    from mosaic_dag.sae import default_sae_name
    from mosaic_dag.sae_registry import matching_saes, read_registry

    registry = read_registry(registry_path)  # read from disk each call: a pip upgrade must be seen
    by_id = {m.id: m for m in cfg.models}
    entries = matching_saes(registry, list(by_id), {m.id: list(m.layers) for m in cfg.models})
    found = {}
    for e in entries:
        if _width(e.sae_id) > max_width:
            continue
        t = Target(by_id[e.configured_model].name, e.layer, default_sae_name("registry", e.release, e.sae_id))
        found[t.key] = t
    return [found[k] for k in sorted(found)]


def make_new_sae_release_sensor(registry_path: Path | None = None, default_status: DefaultSensorStatus
                                = DefaultSensorStatus.STOPPED):  # type: ignore[no-untyped-def]
    """Sensor factory (the path override is for tests and for users with their own registry file)."""

    @sensor(name="new_sae_release_sensor", minimum_interval_seconds=3600, default_status=default_status,
            description="Re-reads sae-lens's pretrained_saes.yaml; adds partitions and requests runs for new "
            "(release, sae_id) pairs that fit a configured model and layer.")
    def new_sae_release_sensor(context: SensorEvaluationContext) -> SensorResult:
        from mosaic_dag.storage import stable_hash

        cfg = _config()
        path = registry_path or (Path(os.environ[REGISTRY_ENV]) if os.environ.get(REGISTRY_ENV) else None)
        found = registry_targets(cfg, path)
        cursor = stable_hash(sorted(t.key for t in found))
        if cursor == context.cursor:
            return SensorResult(skip_reason="no new SAE release")
        known = set(context.instance.get_dynamic_partitions(target_partitions.name))
        new = [t for t in found if t.key not in known]
        runs: list[RunRequest] = []
        for t in new:
            runs.append(RunRequest(run_key=f"sae:{t.key}", job_name=sae_job.name, partition_key=t.key))
            for d in dataset_keys(cfg):
                runs.append(RunRequest(run_key=f"features:{t.key}|{d.key}", job_name=features_job.name,
                                       partition_key=MultiPartitionKey({TARGET_DIM: t.key, DATASET_DIM: d.key})))
        return SensorResult(
            run_requests=runs,
            dynamic_partitions_requests=[target_partitions.build_add_request([t.key for t in new])] if new else [],
            cursor=cursor,
        )

    return new_sae_release_sensor


new_sae_release_sensor = make_new_sae_release_sensor()


@schedule(cron_schedule="0 3 * * 1", job=features_job, default_status=DefaultScheduleStatus.STOPPED,
          description="Weekly: re-materialize every (target, dataset) partition; unchanged inputs are cache hits.")
def weekly_refresh(context: ScheduleEvaluationContext):  # type: ignore[no-untyped-def]
    cfg = _config()
    stamp = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "now"
    for t in targets(cfg):
        for d in dataset_keys(cfg):
            yield RunRequest(run_key=f"{stamp}:{t.key}|{d.key}",
                             partition_key=MultiPartitionKey({TARGET_DIM: t.key, DATASET_DIM: d.key}))


def resources() -> dict[str, object]:
    return {
        "experiment": ExperimentResource(config_path=os.environ.get(CONFIG_ENV, "")),
        "model": ModelResource(),
        "sae": SaeResource(),
        "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
    }


defs = Definitions(
    assets=ALL_ASSETS,
    sensors=[config_partitions_sensor, new_sae_release_sensor],
    schedules=[weekly_refresh],
    jobs=[dataset_job, sae_job, features_job, transfer_job, report_job],
    resources=resources(),
)
