"""Dagster Definitions for the code location (``dagster dev -w workspace.yaml``).

The config is read from $MOSAIC_CONFIG (the embedded demo when unset) when the code location loads:
the training partitions of local SAEs and each asset's code version come from it. Partitions are
dynamic: ``mosaic run`` registers them, and so does ``config_partitions_sensor`` on each tick.
``new_sae_release_sensor`` watches sae-lens's packaged registry and only adds target partitions for
SAEs that fit a configured model and layer; every asset carries an eager automation condition, so the
``mosaic_automation`` sensor then materializes whatever is missing or has newer upstream data, and
the ``dataset`` asset is re-read every Monday (``on_cron``), which refreshes the whole graph.
"""

import os
import re
import warnings
from pathlib import Path

from dagster import (
    AssetSelection,
    AssetsDefinition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from assets import analysis, datasets, hidden_states, interventions, judge, probes, sae
from assets.partitions import dataset_partitions, target_partitions
from mosaic_dag.config import ExperimentConfig, load_config
from mosaic_dag.errors import MosaicError
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource
from resources.experiment import CONFIG_ENV
from resources.handles import HandleIOManager

REGISTRY_ENV = "MOSAIC_SAE_REGISTRY"
MAX_REGISTRY_WIDTH = 65536


def _config() -> ExperimentConfig:
    return load_config(os.environ.get(CONFIG_ENV) or None)


def build_assets(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    """Every asset of the graph for this config (``None``: a config that could not be read — the
    steps then fail with its error line)."""
    with warnings.catch_warnings():  # partitioned asset checks are a Dagster preview feature
        warnings.simplefilter("ignore")
        return [datasets.build(cfg), hidden_states.build(cfg), *sae.build(cfg), *probes.build(cfg),
                *judge.build(cfg), *interventions.build(cfg),
                *analysis.build(cfg)]


def stages(assets: list[AssetsDefinition]) -> list[list[AssetsDefinition]]:
    """The graph in topological order (Dagster's dependency edges; ties in definition order), cut where
    the partitioning changes: each stage is one run per partition key, independent of each other."""
    graph = Definitions(assets=assets, resources=resources()).resolve_asset_graph()
    order = [a.key for a in assets]
    by_key = {a.key: a for a in assets}
    parents = {key: set(graph.get(key).parent_keys) & set(order) for key in order}
    done: list = []
    while len(done) < len(order):
        key = next(k for k in order if k not in done and parents[k] <= set(done))
        done.append(key)
    out: list[list[AssetsDefinition]] = []
    for key in done:
        a = by_key[key]
        if out and out[-1][0].partitions_def == a.partitions_def:
            out[-1].append(a)
        else:
            out.append([a])
    return out


def stage_name(stage: list[AssetsDefinition]) -> str:
    """The stage's job name: its assets joined (a job may not share an asset's name)."""
    return "__".join(a.key.to_user_string() for a in stage) + "_job"


def stage_jobs(assets: list[AssetsDefinition]) -> list:  # type: ignore[type-arg]
    """One named job per stage (runs show as these, not as ad-hoc asset jobs)."""
    return [define_asset_job(stage_name(stage), selection=AssetSelection.assets(*stage),
                             partitions_def=stage[0].partitions_def)
            for stage in stages(assets)]


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
                     max_width: int = MAX_REGISTRY_WIDTH) -> list[TargetKey]:
    """Targets for registry SAEs that fit a configured model and layer (resid_post, width <= max_width)."""
    from mosaic_dag.sae.spec import default_sae_name
    from mosaic_dag.sae.registry import matching_saes, read_registry

    registry = read_registry(registry_path)  # read from disk each call: a pip upgrade must be seen
    by_id = {m.id: m for m in cfg.models}
    entries = matching_saes(registry, list(by_id), {m.id: list(m.layers) for m in cfg.models})
    found = {}
    for e in entries:
        if _width(e.sae_id) > max_width:
            continue
        t = TargetKey(by_id[e.configured_model].name, e.layer, default_sae_name("registry", e.release, e.sae_id))
        found[t.key] = t
    return [found[k] for k in sorted(found)]


def make_new_sae_release_sensor(registry_path: Path | None = None, default_status: DefaultSensorStatus
                                = DefaultSensorStatus.STOPPED):  # type: ignore[no-untyped-def]
    """Sensor factory (the path override is for tests and for users with their own registry file)."""

    @sensor(name="new_sae_release_sensor", minimum_interval_seconds=3600, default_status=default_status,
            description="Re-reads sae-lens's pretrained_saes.yaml and adds a target partition for each new "
            "(release, sae_id) that fits a configured model and layer; automation materializes the rest.")
    def new_sae_release_sensor(context: SensorEvaluationContext) -> SensorResult:
        from mosaic_dag.storage import stable_hash

        cfg = _config()
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

AUTOMATION_ENV = "MOSAIC_AUTOMATION"  # "off": the automation sensor starts stopped (turn it on in the UI)
automation_sensor = AutomationConditionSensorDefinition(
    "mosaic_automation", target=AssetSelection.all(),
    default_status=DefaultSensorStatus.STOPPED if os.environ.get(AUTOMATION_ENV) == "off" else DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition: materializes missing partitions and partitions "
    "whose upstream has newer data (new dataset partitions, new SAE partitions, changed sources).")


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
        return _config()
    except MosaicError:
        return None  # the steps report the config's error line when they run


defs = build_definitions(_load())
