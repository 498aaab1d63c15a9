"""Materialize the asset graph for a config into a persistent Dagster instance (used by the CLI).

The order is Dagster's: the graph's assets in topological order, cut into stages where the
partitioning changes (``mosaic_dag.automation.jobs.stages``); each stage is one named job, run once per
partition key, so ``dagster dev`` shows the same runs, materializations, lineage and partitions.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosaic_dag.paths import report_dir
from mosaic_dag.config import ExperimentConfig, load_config
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, dataset_keys, targets

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
    """One materialization: ``seconds`` of the whole Dagster run it came from, ``step_seconds`` of its own step."""

    asset: str
    partition: str
    seconds: float
    metadata: dict[str, Any]
    step_seconds: float = float("nan")


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
    from mosaic_dag.automation.sensors import missing_partitions
    from mosaic_dag.storage import file_lock

    with file_lock(dagster_home() / INSTANCE_LOCK):
        new_t, new_d = missing_partitions(instance, cfg)
        if new_t:
            instance.add_dynamic_partitions(target_partitions.name, new_t)
        if new_d:
            instance.add_dynamic_partitions(dataset_partitions.name, new_d)
    return new_t, new_d


def _stage_partitions(cfg: ExperimentConfig, partitions_def: Any) -> list[tuple[Any, str]]:
    """(partition key, label) of a stage, from the config (the same keys the instance holds)."""
    from dagster import MultiPartitionKey

    from assets.partitions import dataset_partitions, target_partitions

    if partitions_def is None:
        return [(None, "all")]
    if partitions_def == dataset_partitions:
        return [(d.key, d.key) for d in dataset_keys(cfg)]
    if partitions_def == target_partitions:
        return [(t.key, t.key) for t in targets(cfg)]
    return [(MultiPartitionKey({TARGET_DIM: t.key, DATASET_DIM: d.key}), f"{t.key} × {d.key}")
            for t in targets(cfg) for d in dataset_keys(cfg)]


@dataclass
class PartitionRun:
    """One Dagster run of one stage for one partition key (what a worker process returns)."""

    job: str
    label: str
    seconds: float
    steps: list[StepRecord]
    error: str | None = None


def _definitions(config_path: str, resource_defs: dict[str, object] | None = None) -> Any:
    from mosaic_dag.definitions import build_definitions

    return build_definitions(load_config(config_path or None), resource_defs=resource_defs)


def _provenance_tags(config_path: str) -> dict[str, str]:
    """Config hash, code version and library versions as Dagster run tags (``mosaic/config_hash`` …)."""
    from mosaic_dag.config import load_config
    from mosaic_dag.provenance import provenance

    return {k.replace("mosaic.", "mosaic/", 1): v[:255] for k, v in provenance(load_config(config_path or None)).items()}


def run_partition(config_path: str, job_name: str, partition: Any, label: str,
                  resource_defs: dict[str, object] | None = None, instance: Any = None) -> PartitionRun:
    """Execute one stage job for one partition in this process's Dagster instance.

    ``resource_defs``: the resources to run with (``definitions.resources``); passing the same ones to
    every partition's run is what lets the model and SAE resources keep their loads between runs.
    ``instance``: the open Dagster instance (default: ``DagsterInstance.get()``, which opens it anew)."""
    from dagster import DagsterInstance
    from dagster._core.errors import DagsterAssetCheckFailedError

    from mosaic_dag.errors import MosaicError

    console_level = os.environ.get("MOSAIC_LOG_LEVEL", "CRITICAL")
    instance = instance if instance is not None else DagsterInstance.get()
    job = _definitions(config_path, resource_defs).resolve_job_def(job_name)
    t0 = time.perf_counter()
    run_id = str(uuid.uuid4())
    try:
        result = job.execute_in_process(
            partition_key=str(partition) if partition is not None else None, instance=instance,
            tags={"mosaic/config": config_path or "demo", **_provenance_tags(config_path)}, run_id=run_id,
            run_config={"loggers": {"console": {"config": {"log_level": console_level}}}})
    except DagsterAssetCheckFailedError:
        raise MosaicError(_failed_check_line(instance, run_id, label)) from None
    secs = time.perf_counter() - t0
    own = _step_seconds(instance, run_id)
    steps = [StepRecord(ev.asset_key.to_user_string(), label, secs, _metadata_values(ev), own.get(ev.step_key or "", float("nan")))
             for ev in result.get_asset_materialization_events()]
    if any(not e.passed and e.blocking for e in result.get_asset_check_evaluations()):
        raise MosaicError(_failed_check_line(instance, run_id, label))
    return PartitionRun(job_name, label, secs, steps)


def _step_seconds(instance: Any, run_id: str) -> dict[str, float]:
    """Seconds from each step's start to its success, from the run's events in the instance."""
    from dagster import DagsterEventType

    start: dict[str, float] = {}
    out: dict[str, float] = {}
    records = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
    for record in sorted(records, key=lambda r: r.timestamp):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            start[event.step_key] = record.timestamp
        elif event.step_key in start:
            out[event.step_key] = record.timestamp - start[event.step_key]
    return out


def _failed_check_line(instance: Any, run_id: str, label: str) -> str:
    """The line of the blocking check that failed in a run (its description names the number and the fix)."""
    from dagster import DagsterEventType

    for record in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data
        if not evaluation.passed and evaluation.blocking:
            key = evaluation.asset_check_key
            why = evaluation.description or f"check {key.name} failed on {key.asset_key.to_user_string()} {label}"
            return f"{why} (blocking check '{key.name}')"
    return f"a blocking check failed for {label}; see the run's Checks in the Dagster UI"


_WORKER_RESOURCES: dict[str, object] | None = None
_WORKER_INSTANCE: Any = None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(config_path: str, threads: int) -> None:
    """A worker process's resources and Dagster instance, made once when the pool starts it, so its runs
    share their loads; ``threads``: its share of the cores (workers x threads = the cores, not more)."""
    global _WORKER_RESOURCES, _WORKER_INSTANCE
    import torch
    from dagster import DagsterInstance

    from mosaic_dag.definitions import resources

    torch.set_num_threads(threads)
    _WORKER_RESOURCES = resources(config_path or None)
    _WORKER_INSTANCE = DagsterInstance.get()


def _run_in_worker(config_path: str, job_name: str, partition: str | None, label: str) -> PartitionRun:
    """A worker process: the same run, with the error line instead of a traceback across processes."""
    from mosaic_dag.cli import _root_cause

    try:
        return run_partition(config_path, job_name, partition, label, _WORKER_RESOURCES, _WORKER_INSTANCE)
    except Exception as err:  # noqa: BLE001 - reported as one line by the parent
        return PartitionRun(job_name, label, 0.0, [], error=str(_root_cause(err)))


def run_experiment(config_path: str | Path | None, *, progress: bool = True, echo: Any = print,
                   workers: int | None = None) -> RunSummary:
    """Validate the config, register partitions, then run the graph stage by stage in Dagster's
    topological order; the partitions of a stage are independent and run ``workers`` at a time."""

    from mosaic_dag.automation.jobs import stage_name, stages
    from mosaic_dag.definitions import resources
    from mosaic_dag.errors import MosaicError
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
    shared = resources(abs_config or None)  # one set for every run in this process: models and SAEs load once
    summary = RunSummary(cfg, home, shared["mlflow"].uri(cfg))  # type: ignore[attr-defined]
    defs = _definitions(abs_config)
    n_workers = workers or cfg.run.workers
    echo(f"mosaic: experiment {cfg.name!r}, Dagster instance {home}" + (f", {n_workers} workers" if n_workers > 1 else ""))

    def show(run: PartitionRun) -> None:
        summary.steps.extend(run.steps)
        echo(f"  ✓ {run.job.removesuffix('_job').replace('__', '+'):<38} {run.label:<44} {run.seconds:6.1f}s")

    for stage in stages(list(defs.assets)):
        job = stage_name(stage)
        parts = _stage_partitions(cfg, stage[0].partitions_def)
        if n_workers <= 1 or len(parts) <= 1:
            for partition, label in parts:
                show(run_partition(abs_config, job, partition, label, shared, instance))
            continue
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n_procs = min(n_workers, len(parts))
        with ProcessPoolExecutor(max_workers=n_procs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(abs_config, max(1, usable_cores() // n_procs))) as pool:
            futures = [pool.submit(_run_in_worker, abs_config, job, None if p is None else str(p), label)
                       for p, label in parts]
            errors = []
            for fut in futures:
                run = fut.result()
                if run.error:
                    errors.append(run.error)
                else:
                    show(run)
            if errors:
                raise MosaicError(errors[0])
    summary.report = report_dir(cfg) / "index.html"
    return summary
