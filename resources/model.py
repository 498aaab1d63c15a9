"""Language models for extraction, held by the resource: one load per holder, shared by every asset that needs it."""

from dagster import ConfigurableResource, ResourceDependency
from pydantic import Field

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.lm.models import LoadedModel, ModelCache, ModelLoader, load_named_model, model_loader


class ModelResource(ConfigurableResource):
    """Loads Hugging Face ids, local folders or the bundled Gemma 3 270M (see mosaic_dag.lm.models).

    ``cache``: the models this resource has loaded. Dagster copies a resource for every run but keeps
    the object it was given here, so every run handed this resource reuses the same loads (``mosaic
    run`` runs each partition as its own Dagster run in one process).
    """

    cache: ResourceDependency[ModelCache] = Field(default_factory=ModelCache)

    def load(self, cfg: ExperimentConfig, model: str) -> LoadedModel:
        return load_named_model(cfg, model, self.cache)

    def loader(self, cfg: ExperimentConfig) -> ModelLoader:
        return model_loader(cfg, self.cache)
