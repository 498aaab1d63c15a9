"""SAEs from every source behind one resource: sae-lens registry, a local sae-lens folder, or trained here."""

from typing import Any

from dagster import ConfigurableResource

from mosaic_dag.codes import get_sae, sae_spec
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.partitions import Target


class SaeResource(ConfigurableResource):
    """``device``: where SAEs run (cpu by default; encoding is cheap next to the LM forward)."""

    device: str = "cpu"

    def spec(self, cfg: ExperimentConfig, target: Target) -> Any:
        """The sae-lens source of a target (registry release/id, or a folder)."""
        return sae_spec(cfg, target)

    def load(self, cfg: ExperimentConfig, target: Target) -> Any:
        """The target's SAE, loaded once per process (registry: ``SAE.from_pretrained``)."""
        return get_sae(cfg, target)
