"""Partitions and how each asset's partitions map onto its upstream's (see mosaic_dag.keys).

Dagster multi-partitions have two dimensions and dynamic partitions map only by identity, by
dimension or as a fixed set, so the graph uses exactly three partitionings:

- ``dataset`` (``<dataset>.<language>``): ``dataset`` and ``hidden_states`` — one forward pass per model
  serves every configured layer, so one hidden-states partition is the work actually done;
- ``target`` (``<model>.L<layer>.<sae>``): ``sae`` and ``transfer``;
- ``target × dataset``: ``sae_codes``, ``pooled_features``, ``probes``, ``conditions``.
"""

from __future__ import annotations

import warnings

from dagster import (
    AllPartitionMapping,
    AssetIn,
    DynamicPartitionsDefinition,
    IdentityPartitionMapping,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    PartitionMapping,
    SpecificPartitionsPartitionMapping,
)

from mosaic_dag.keys import DATASET_DIM, TARGET_DIM

target_partitions = DynamicPartitionsDefinition(name=TARGET_DIM)
dataset_partitions = DynamicPartitionsDefinition(name=DATASET_DIM)
target_dataset_partitions = MultiPartitionsDefinition(
    {TARGET_DIM: target_partitions, DATASET_DIM: dataset_partitions}
)

SAME = IdentityPartitionMapping()
EVERY = AllPartitionMapping()
with warnings.catch_warnings():  # a beta class in Dagster 1.13; the mapping itself is what the graph means
    warnings.simplefilter("ignore")
    BY_DATASET = MultiToSingleDimensionPartitionMapping(partition_dimension_name=DATASET_DIM)
    BY_TARGET = MultiToSingleDimensionPartitionMapping(partition_dimension_name=TARGET_DIM)


def training_mapping(keys: list[str] | None) -> SpecificPartitionsPartitionMapping | AllPartitionMapping:
    """``sae`` ← ``hidden_states``/``dataset``: exactly the partitions local SAEs train on (every one
    when the config could not be read)."""
    return EVERY if keys is None else SpecificPartitionsPartitionMapping(sorted(set(keys)))


def multi_keys(context) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{dimension: key} of a multi-partition run, whether Dagster hands us a MultiPartitionKey or a string."""
    key = context.partition_key
    by_dim = getattr(key, "keys_by_dimension", None)
    if by_dim is None:
        by_dim = target_dataset_partitions.get_partition_key_from_str(str(key)).keys_by_dimension
    return dict(by_dim)


def dataset_part(key: str) -> str:
    """The dataset key inside a ``target × dataset`` key string (``<dataset>|<target>``)."""
    return target_dataset_partitions.get_partition_key_from_str(str(key)).keys_by_dimension[DATASET_DIM]


def upstream(**inputs: tuple[str, PartitionMapping]) -> dict[str, AssetIn]:
    """A step's inputs by name: (upstream asset, how that asset's partitions map onto this step's)."""
    return {name: AssetIn(asset, partition_mapping=mapping) for name, (asset, mapping) in inputs.items()}


POOLED_WITH_DATASET = {"pooled": ("pooled_features", SAME), "data": ("dataset", BY_DATASET)}
