"""Experiment config: one YAML file, validated before any compute.

The shape follows the seed tool's config.yaml (``models`` / ``datasets`` / ``classification``)
so its users feel at home. Every error is a single line naming the key path and what is allowed.
One module per section; every public name is importable from ``mosaic_dag.config``.
"""

from mosaic_dag.config.base import DENSE_POOLINGS, POOLINGS, PositiveInt, Pooling
from mosaic_dag.config.classification import ClassificationConfig, ConditionsConfig, Threshold, TransferConfig
from mosaic_dag.config.datasets import (
    IMAGE_LANGUAGE,
    BehaviourConfig,
    DatasetConfig,
    DescriptionsConfig,
    SplitConfig,
)
from mosaic_dag.config.evaluation import InterventionsConfig, JudgeConfig, SaeQualityConfig
from mosaic_dag.config.experiment import ExperimentConfig, MlflowConfig, RunConfig
from mosaic_dag.config.loading import config_text, load_config, parse_config
from mosaic_dag.config.models import BUNDLED_MODEL, ModelConfig, SaeConfig

__all__ = [
    "BUNDLED_MODEL", "DENSE_POOLINGS", "IMAGE_LANGUAGE", "POOLINGS", "BehaviourConfig", "ClassificationConfig",
    "ConditionsConfig", "DatasetConfig", "DescriptionsConfig", "ExperimentConfig", "InterventionsConfig",
    "JudgeConfig", "MlflowConfig", "ModelConfig", "Pooling", "PositiveInt", "RunConfig", "SaeConfig",
    "SaeQualityConfig", "SplitConfig", "Threshold", "TransferConfig", "config_text", "load_config", "parse_config",
]
