"""SAE releases in sae-lens's packaged registry that fit the config: the targets ``new_sae_release_sensor`` adds."""

from __future__ import annotations

import re
from pathlib import Path

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.keys import TargetKey
from mosaic_dag.sae.spec import default_sae_name
from mosaic_dag.sae.registry import matching_saes, read_registry

MAX_REGISTRY_WIDTH = 65536


def _width(sae_id: str) -> int:
    """The width an sae_id names (``width_16k`` -> 16384); 0 when it names none."""
    m = re.search(r"width_(\d+)([km]?)", sae_id, flags=re.IGNORECASE)
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def registry_targets(cfg: ExperimentConfig, registry_path: Path | None = None,
                     max_width: int = MAX_REGISTRY_WIDTH) -> list[TargetKey]:
    """Targets for registry SAEs that fit a configured model and layer (resid_post, width <= max_width)."""
    registry = read_registry(registry_path)  # read from disk each call: a pip upgrade must be seen
    by_id = {m.id: m for m in cfg.models}
    entries = matching_saes(registry, list(by_id), {m.id: list(m.layers) for m in cfg.models})
    found = {}
    for e in entries:
        if _width(e.sae_id) > max_width:
            continue
        t = TargetKey(by_id[e.configured_model].name, e.layer, default_sae_name("registry", e.release, e.sae_id))
        found[t.key] = t
    return [found[k] for k in sorted(found)]
