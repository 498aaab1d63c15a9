"""Dynamic partitions, registered from the config (see mosaic_dag.partitions for the key format)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, MultiPartitionsDefinition

from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM

target_partitions = DynamicPartitionsDefinition(name=TARGET_DIM)
dataset_partitions = DynamicPartitionsDefinition(name=DATASET_DIM)
target_dataset_partitions = MultiPartitionsDefinition(
    {TARGET_DIM: target_partitions, DATASET_DIM: dataset_partitions}
)


def multi_keys(context) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{dimension: key} of a multi-partition run, whether Dagster hands us a MultiPartitionKey or a string."""
    key = context.partition_key
    by_dim = getattr(key, "keys_by_dimension", None)
    if by_dim is None:
        by_dim = target_dataset_partitions.get_partition_key_from_str(str(key)).keys_by_dimension
    return dict(by_dim)
