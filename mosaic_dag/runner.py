"""Materialize the asset graph for a config into a persistent Dagster instance (used by the CLI).

Each step is a real Dagster run in ``$DAGSTER_HOME`` (default ``./.dagster_home``), so ``dagster dev``
shows the same materializations, lineage and partitions afterwards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosaic_dag.config import ExperimentConfig, load_config
from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM, dataset_keys, targets

PROGRESS_ENV = "MOSAIC_PROGRESS"


# what the CLI writes into a dagster.yaml it creates: no telemetry, so no banner (delete it to opt in)
NEW_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster_home (created), exported for Dagster to pick up.

    A dagster.yaml the CLI creates turns Dagster's telemetry off (so its banner never prints);
    a dagster.yaml that is already there is left as it is.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    yaml_file = home / "dagster.yaml"
    try:
        with open(yaml_file, "x") as fh:  # only if absent; two first runs at once: one creates it
            fh.write(NEW_INSTANCE_YAML)
    except FileExistsError:
        if yaml_file.stat().st_size == 0:  # the empty file earlier mosaic versions created
            from mosaic_dag.storage import atomic_path

            with atomic_path(yaml_file) as tmp:
                tmp.write_text(NEW_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@dataclass
class StepRecord:
    asset: str
    partition: str
    seconds: float
    metadata: dict[str, Any]


@dataclass
class RunSummary:
    config: ExperimentConfig
    dagster_home: Path
    tracking_uri: str
    steps: list[StepRecord] = field(default_factory=list)
    report: Path | None = None

    def forward_calls(self) -> int:
        return sum(int(s.metadata.get("forward_calls", 0) or 0) for s in self.steps if s.asset == "hidden_states")


def _metadata_values(event: Any) -> dict[str, Any]:
    out = {}
    for k, v in (event.materialization.metadata or {}).items():
        out[k] = getattr(v, "value", v)
    return out


INSTANCE_LOCK = ".mosaic-instance.lock"


def open_instance(home: Path) -> Any:
    """The Dagster instance in ``home``, created under a file lock.

    Two first runs at once would otherwise both create the sqlite schema (``alembic_version already
    exists``, or two schema heads that break the instance for good); with the lock the second waits.
    """
    from dagster import DagsterInstance

    from mosaic_dag.storage import file_lock

    with file_lock(home / INSTANCE_LOCK):
        instance = DagsterInstance.get()
        instance.get_runs_count()  # touch run storage so its schema exists before the lock is released
    return instance


def register_partitions(instance: Any, cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """Add the config's missing dynamic partitions; under the instance lock so two runs never add one twice."""
    from assets.partitions import dataset_partitions, target_partitions
    from mosaic_dag.definitions import missing_partitions
    from mosaic_dag.storage import file_lock

    with file_lock(dagster_home() / INSTANCE_LOCK):
        new_t, new_d = missing_partitions(instance, cfg)
        if new_t:
            instance.add_dynamic_partitions(target_partitions.name, new_t)
        if new_d:
            instance.add_dynamic_partitions(dataset_partitions.name, new_d)
    return new_t, new_d


def run_experiment(config_path: str | Path | None, *, progress: bool = True, echo: Any = print) -> RunSummary:
    """Load and validate the config, register partitions, and materialize every partition in order."""
    from dagster import DagsterInstance, MultiPartitionKey, materialize

    from assets.analysis import conditions, report, transfer
    from assets.datasets import dataset
    from assets.hidden_states import hidden_states
    from assets.probes import pooled_features, probes
    from assets.sae import sae, sae_codes
    from mosaic_dag.definitions import ALL_ASSETS
    from resources import ExperimentResource, MlflowResource, ModelResource, SaeResource
    from resources.experiment import CONFIG_ENV

    cfg = load_config(config_path)
    from mosaic_dag.storage import sweep_temp

    sweep_temp(cfg.data_path)  # temp files of killed runs (live writers' are kept)
    abs_config = str(Path(config_path).resolve()) if config_path else ""
    os.environ[CONFIG_ENV] = abs_config
    if progress:
        os.environ[PROGRESS_ENV] = "1"
    home = dagster_home()
    instance = open_instance(home)
    register_partitions(instance, cfg)
    mlflow_res = MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", ""))
    resources = {"experiment": ExperimentResource(config_path=abs_config), "model": ModelResource(),
                 "sae": SaeResource(), "mlflow": mlflow_res}
    summary = RunSummary(cfg, home, mlflow_res.uri(cfg))
    console_level = os.environ.get("MOSAIC_LOG_LEVEL", "CRITICAL")

    def step(asset: Any, partition: Any, label: str, also: tuple[Any, ...] = ()) -> None:
        t0 = time.perf_counter()
        result = materialize(ALL_ASSETS, selection=[asset, *also], partition_key=partition, instance=instance,
                             resources=resources, tags={"mosaic/config": abs_config or "demo"},
                             run_config={"loggers": {"console": {"config": {"log_level": console_level}}}})
        secs = time.perf_counter() - t0
        for ev in result.get_asset_materialization_events():
            summary.steps.append(StepRecord(ev.asset_key.to_user_string(), label, secs, _metadata_values(ev)))
        names = "+".join(a.key.to_user_string() for a in (asset, *also))
        echo(f"  ✓ {names:<38} {label:<44} {secs:6.1f}s")

    echo(f"mosaic: experiment {cfg.name!r}, Dagster instance {home}")
    for dkey in dataset_keys(cfg):
        step(dataset, dkey.key, dkey.key)
    for target in targets(cfg):
        for dkey in dataset_keys(cfg):
            mpk = MultiPartitionKey({TARGET_DIM: target.key, DATASET_DIM: dkey.key})
            step(hidden_states, mpk, f"{target.key} × {dkey.key}")
    for target in targets(cfg):
        step(sae, target.key, target.key)
    for target in targets(cfg):
        for dkey in dataset_keys(cfg):
            mpk = MultiPartitionKey({TARGET_DIM: target.key, DATASET_DIM: dkey.key})
            step(sae_codes, mpk, f"{target.key} × {dkey.key}", also=(pooled_features, probes, conditions))
    for target in targets(cfg):
        step(transfer, target.key, target.key)
    step(report, None, "all")
    summary.report = cfg.data_path / "report" / "index.md"
    return summary
