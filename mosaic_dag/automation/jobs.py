"""Stage jobs: the graph in Dagster's topological order, cut where the partitioning changes.

Each stage is one named job run once per partition key; ``mosaic run`` executes them in order and
``dagster dev`` shows the same job names.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, AssetsDefinition, define_asset_job


def stages(assets: list[AssetsDefinition]) -> list[list[AssetsDefinition]]:
    """The graph in topological order (Dagster's dependency edges; ties in definition order), cut where
    the partitioning changes: each stage is one run per partition key, independent of each other."""
    order = [a.key for a in assets]
    by_key = {a.key: a for a in assets}
    parents = {key: {dep.asset_key for dep in by_key[key].specs_by_key[key].deps} & set(order) for key in order}
    done: list = []  # type: ignore[type-arg]
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


def stage_jobs(assets: list[AssetsDefinition]) -> list[Any]:  # unresolved asset jobs (Definitions resolves them)
    """One named job per stage (runs show as these, not as ad-hoc asset jobs)."""
    return [define_asset_job(stage_name(stage), selection=AssetSelection.assets(*stage),
                             partitions_def=stage[0].partitions_def)
            for stage in stages(assets)]
