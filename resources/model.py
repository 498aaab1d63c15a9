"""Language models for extraction; one load per process, shared by every asset that needs it."""

from __future__ import annotations

from dagster import ConfigurableResource

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.lm.models import LoadedModel, load_named_model


class ModelResource(ConfigurableResource):
    """Loads Hugging Face ids, local folders or the bundled Gemma 3 270M (see mosaic_dag.lm.models)."""

    def load(self, cfg: ExperimentConfig, model: str) -> LoadedModel:
        return load_named_model(cfg, model)
