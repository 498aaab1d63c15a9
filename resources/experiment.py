"""The experiment config as a resource, so every asset reads the same validated YAML."""

from __future__ import annotations

import os

from dagster import ConfigurableResource

from mosaic_dag.config import ExperimentConfig, load_config

CONFIG_ENV = "MOSAIC_CONFIG"


class ExperimentResource(ConfigurableResource):
    """``config_path`` empty means the embedded demo config (or $MOSAIC_CONFIG when set)."""

    config_path: str = ""

    def load(self) -> ExperimentConfig:
        return load_config(self.config_path or os.environ.get(CONFIG_ENV) or None)
