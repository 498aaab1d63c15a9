"""Dynamic partitions, registered from the config (see mosaic_dag.partitions for the key format)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, MultiPartitionsDefinition

from mosaic_dag.partitions import DATASET_DIM, TARGET_DIM

target_partitions = DynamicPartitionsDefinition(name=TARGET_DIM)
dataset_partitions = DynamicPartitionsDefinition(name=DATASET_DIM)
target_dataset_partitions = MultiPartitionsDefinition(
    {TARGET_DIM: target_partitions, DATASET_DIM: dataset_partitions}
)
