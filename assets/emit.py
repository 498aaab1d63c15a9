"""What every asset shell shares: the decorator defaults, the partition keys it runs for, and its output.

An asset is ``@step_asset(...)`` over one library step; it returns ``emit(handle, metadata, run)``: the
handle as the output, its version as Dagster's data version (staleness) and in the metadata, and the
links to the step's MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dagster import AssetExecutionContext, AssetIn, AutomationCondition, DataVersion, Output, PartitionsDefinition, asset

from assets.partitions import POOLED_WITH_DATASET, multi_keys, target_dataset_partitions, upstream
from assets.versions import code_version
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import Handle
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, DatasetKey, TargetKey, parse_dataset, parse_target
from mosaic_dag.storage import stable_hash
from mosaic_dag.tracking import TrackedRun
from resources.experiment import ExperimentResource
from resources.mlflow import run_metadata


def step_asset(name: str, cfg: ExperimentConfig | None, *, partitions_def: PartitionsDefinition | None,
               group: str, description: str, ins: Mapping[str, AssetIn] | None = None,
               check_specs: Sequence[Any] | None = None,
               automation: AutomationCondition | None = None) -> Callable[..., Any]:
    """``@asset`` with the graph's defaults: handles IO manager, the step's code version, eager automation."""
    return asset(name=name, partitions_def=partitions_def, ins=dict(ins or {}), check_specs=check_specs,
                 group_name=group, io_manager_key="handles", code_version=code_version(name, cfg),
                 automation_condition=automation or AutomationCondition.eager(), description=description)


def pooled_step(name: str, cfg: ExperimentConfig | None, *, description: str,
                check_specs: Sequence[Any] | None = None) -> Callable[..., Any]:
    """A step on one ``target × dataset`` partition's pooled features and its dataset rows (probes, conditions)."""
    return step_asset(name, cfg, partitions_def=target_dataset_partitions, group="probes", check_specs=check_specs,
                      ins=upstream(**POOLED_WITH_DATASET), description=description)


def emit(handle: Handle, metadata: Mapping[str, Any], run: TrackedRun | None = None) -> Output:  # type: ignore[type-arg]
    """The step's output: ``handle`` with its data version, ``metadata`` and the MLflow run link."""
    return Output(handle, data_version=DataVersion(handle.version),
                  metadata={**metadata, "data_version": handle.version, **(run_metadata(run) if run else {})})


def step_partition(context: AssetExecutionContext,
                   experiment: ExperimentResource) -> tuple[ExperimentConfig, TargetKey, DatasetKey]:
    """The config and the (target, dataset) keys of a ``target × dataset`` partition run."""
    keys = multi_keys(context)
    return experiment.load(), parse_target(keys[TARGET_DIM]), parse_dataset(keys[DATASET_DIM])


def input_version(step: str, cfg: ExperimentConfig, *handles: Handle) -> str:
    """What a one-partition step's output depends on: its input handles' versions and its code version."""
    return stable_hash([*(h.version for h in handles), code_version(step, cfg)])


def versions(handles: Mapping[str, Handle | None]) -> list[tuple[str, str | None]]:
    """(partition, handle version) of a fan-in input, sorted: what a many-partition step's inputs hash."""
    return sorted((k, h.version if h is not None else None) for k, h in handles.items())
