"""Partition keys built from the config, so a new model, layer, SAE or language needs no code change.

Dagster multi-partitions have exactly two dimensions, so each combines keys:
``target`` = ``<model>.L<layer>.<sae>`` and ``dataset`` = ``<dataset>.<language>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import ConfigError

TARGET_DIM = "target"
DATASET_DIM = "dataset"


@dataclass(frozen=True)
class TargetKey:
    model: str
    layer: int
    sae: str

    @property
    def key(self) -> str:
        return f"{self.model}.L{self.layer}.{self.sae}"


@dataclass(frozen=True)
class DatasetKey:
    dataset: str
    language: str

    @property
    def key(self) -> str:
        return f"{self.dataset}.{self.language}"


def parse_target(key: str) -> TargetKey:
    parts = key.split(".")
    if len(parts) != 3 or not parts[1].startswith("L") or not parts[1][1:].isdigit():
        raise ConfigError(f"target partition {key!r} is not '<model>.L<layer>.<sae>'")
    return TargetKey(parts[0], int(parts[1][1:]), parts[2])


def parse_dataset(key: str) -> DatasetKey:
    name, sep, language = key.partition(".")
    if not sep or not language:
        raise ConfigError(f"dataset partition {key!r} is not '<dataset>.<language>'")
    return DatasetKey(name, language)


def targets(cfg: ExperimentConfig) -> list[TargetKey]:
    return [TargetKey(m.name, layer, sae.label) for m in cfg.models for layer in m.layers for sae in m.saes]


def dataset_keys(cfg: ExperimentConfig) -> list[DatasetKey]:
    return [DatasetKey(d.name, lang) for d in cfg.datasets for lang in cfg.dataset_languages(d.name)]
