"""Code versions: the asset's code revision plus a hash of the config sections its step reads, so a
config edit marks exactly the assets that read the edited section as changed in the UI."""

from __future__ import annotations

from typing import Any

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.storage import stable_hash

# Bump an asset's number when its step's code changes what it writes.
REVISION = {"dataset": 1, "hidden_states": 1, "sae": 1, "sae_codes": 1, "pooled_features": 1, "probes": 2,
            "conditions": 2, "transfer": 2, "report": 3,
            "judge": 2, "task_transfer": 2, "interventions": 1}

# dataset options added after configs were written: read by the step only when set, so a config that
# does not use them keeps its code versions
_OPTIONAL_AT_DEFAULT = {"label_from": "field", "max_per_class": None, "drop_shared_texts": False}


def _dataset(d: Any) -> dict[str, Any]:
    """What the dataset step reads of a dataset's config: not its task (read by task_transfer only)."""
    out = d.model_dump(exclude={"task", "task_classes"})
    for key, default in _OPTIONAL_AT_DEFAULT.items():
        if out.get(key) == default:
            del out[key]
    return out


def _sections(cfg: ExperimentConfig, asset: str) -> Any:
    models = [m.model_dump(exclude={"saes"}) for m in cfg.models]
    saes = {m.name: [s.model_dump() for s in m.saes] for m in cfg.models}
    c = cfg.classification.model_dump()
    return {
        "dataset": [[_dataset(d) for d in cfg.datasets], cfg.split.model_dump()],
        "hidden_states": models,
        "sae": saes,
        "sae_codes": None,
        "pooled_features": [c["poolings"], c["top_n"]],
        "probes": c,
        "conditions": [cfg.conditions.model_dump(), c["seed"], c["bootstrap"]],
        "transfer": [cfg.transfer.model_dump(), c["seed"], c["bootstrap"]],
        "report": None,
        "judge": [cfg.judge.model_dump(), c["seed"], c["bootstrap"]],
        "interventions": [cfg.interventions.model_dump(), [d.behaviour.model_dump() if d.behaviour else None
                                                          for d in cfg.datasets], c],
        "task_transfer": [[(d.name, d.task, d.task_classes) for d in cfg.datasets], cfg.transfer.model_dump(),
                          c["seed"], c["bootstrap"]],
    }[asset]


def code_version(asset: str, cfg: ExperimentConfig | None) -> str:
    rev = REVISION[asset]
    return f"{rev}" if cfg is None else f"{rev}-{stable_hash(_sections(cfg, asset), length=10)}"
