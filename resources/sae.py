"""SAEs of every origin behind one resource: sae-lens registry, a local sae-lens folder, or trained here."""

from typing import Any

from dagster import ConfigurableResource, ResourceDependency
from pydantic import Field

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import SaeHandle
from mosaic_dag.keys import TargetKey
from mosaic_dag.sae.resolve import SaeCache, load_target_sae, sae_spec
from mosaic_dag.sae.spec import SaeSpec


class SaeResource(ConfigurableResource):
    """``device``: where SAEs run (cpu by default; encoding is cheap next to the LM forward).

    ``cache``: the SAEs this resource has loaded, kept across the runs it is handed to (as for models).
    """

    cache: ResourceDependency[SaeCache] = Field(default_factory=SaeCache)
    device: str = "cpu"

    def spec(self, cfg: ExperimentConfig, target: TargetKey, handle: SaeHandle | None = None) -> SaeSpec:
        """Where a target's SAE comes from (registry release/id, or a folder)."""
        return sae_spec(cfg, target, handle.path if handle is not None and handle.origin == "train" else None)

    def load(self, cfg: ExperimentConfig, target: TargetKey, handle: SaeHandle | None = None) -> Any:
        """The target's SAE, loaded once per cache (registry: ``SAE.from_pretrained``)."""
        return load_target_sae(cfg, target, handle, self.cache)
