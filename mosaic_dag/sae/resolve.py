"""Which SAE a target uses (config or registry sensor), where it lives, loading it once, and checking it fits.

    <data_dir>/saes/<model>/L<layer>/<sae>-<key>/          trained SAEs (sae-lens format)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mosaic_dag.config import ExperimentConfig, SaeConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.handles import DatasetHandle, HiddenHandle, SaeHandle, UpstreamMissing
from mosaic_dag.keys import TargetKey, dataset_keys
from mosaic_dag.paths import trained_sae_dir
from mosaic_dag.lm.hidden_states import model_fingerprint
from mosaic_dag.sae.compat import check_compatible, sae_info
from mosaic_dag.sae.loading import load_sae
from mosaic_dag.sae.registry import matching_saes, read_registry
from mosaic_dag.sae.spec import SaeMismatchError, SaeSpec, default_sae_name
from mosaic_dag.sae.training import RECIPE_VERSION
from mosaic_dag.storage import stable_hash



def sae_config(cfg: ExperimentConfig, target: TargetKey) -> SaeConfig:
    """The config's SAE for this target, or a registry SAE that the release sensor added by key."""
    mcfg = cfg.model(target.model)
    for sae in mcfg.saes:
        if sae.label == target.sae:
            return sae

    for entry in matching_saes(read_registry(), [mcfg.id], {mcfg.id: [target.layer]}):
        if default_sae_name("registry", entry.release, entry.sae_id) == target.sae:
            return SaeConfig(origin="registry", release=entry.release, sae_id=entry.sae_id, name=target.sae)
    raise ConfigError(f"sae {target.sae!r} is not configured for model {target.model!r}; known: {[s.label for s in mcfg.saes]}")


def training_partitions(cfg: ExperimentConfig, sae: SaeConfig) -> list[str]:
    """The dataset partitions whose TRAIN split trains a local SAE: ``train_on`` (dataset names or
    ``<dataset>.<language>`` keys), else every dataset partition of the config."""
    if sae.origin != "train":
        return []
    every = [k.key for k in dataset_keys(cfg)]
    if not sae.train_on:
        return every
    return [k for k in every if k in sae.train_on or k.partition(".")[0] in sae.train_on]


def training_identity(hidden: HiddenHandle, data: DatasetHandle, model: str, layer: int) -> str:
    """What one training partition contributes: its cache at this layer and which rows are train."""
    return stable_hash([hidden.cache(model, layer).name, data.splits_hash])


def trained_dir(cfg: ExperimentConfig, target: TargetKey, training: list[str]) -> Path:
    """Folder of a locally trained SAE: keyed by model weights, layer, SAE settings and training data."""
    scfg = sae_config(cfg, target)
    identity = {"model": model_fingerprint(cfg, target.model), "layer": target.layer,
                "sae": scfg.model_dump(exclude={"train_on"}), "data": sorted(training), "recipe": RECIPE_VERSION,
                "max_length": cfg.model(target.model).max_length}
    return trained_sae_dir(cfg, target, identity)


def sae_spec(cfg: ExperimentConfig, target: TargetKey, trained: Path | str | None = None) -> SaeSpec:
    """The SaeSpec to load this target's SAE (a trained one points at its folder, ``trained``)."""
    scfg = sae_config(cfg, target)
    if scfg.origin == "train":
        if trained is None:
            raise UpstreamMissing(f"sae {target.key!r} is trained here and not materialized yet; "
                                  "materialize the 'sae' asset for it first")
        return SaeSpec(origin="local", path=str(trained), name=target.sae)
    path = str(cfg.resolve(scfg.path)) if scfg.path else None
    return SaeSpec(origin=scfg.origin, release=scfg.release, sae_id=scfg.sae_id, path=path, name=target.sae)


def spec_identity(spec: SaeSpec) -> str:
    """Registry id, or the local folder plus its weights' size and time: what the codes are keyed on."""
    if spec.origin == "registry":
        return f"registry:{spec.release}/{spec.sae_id}"
    weights = Path(spec.path) / "sae_weights.safetensors"
    stamp = [weights.stat().st_size, int(weights.stat().st_mtime)] if weights.exists() else "absent"
    return f"local:{spec.path}@{stable_hash(stamp)}"


class SaeCache:
    """SAEs loaded once and shared by every step given this cache (the SAE resource holds one).

    Keyed by ``spec_identity``: a local folder's key includes its weights' size and time, so a
    rewritten folder is loaded again.
    """

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}
        self._lock = threading.Lock()

    def load(self, spec: SaeSpec) -> Any:
        ident = spec_identity(spec)
        with self._lock:
            if ident not in self._held:
                self._held[ident] = load_sae(spec)
            return self._held[ident]

    def forget(self, folder: Path | str) -> None:
        """Drop what is held of a local folder (its weights were removed or rewritten)."""
        prefix = f"local:{folder}@"
        with self._lock:
            for ident in [i for i in self._held if i.startswith(prefix)]:
                del self._held[ident]


def load_target_sae(cfg: ExperimentConfig, target: TargetKey, handle: SaeHandle | None = None,
                    saes: SaeCache | None = None) -> Any:
    """The target's SAE (a trained one from its handle's folder), held in ``saes`` when given."""
    spec = sae_spec(cfg, target, handle.path if handle is not None and handle.origin == "train" else None)
    return saes.load(spec) if saes is not None else load_sae(spec)


def registry_hint(cfg: ExperimentConfig, target: TargetKey) -> str | None:
    scfg = sae_config(cfg, target)
    if scfg.origin != "registry":
        return None

    for entry in read_registry().get(scfg.release, {}).get("saes", []):
        if entry.get("id") == scfg.sae_id:
            return str(entry.get("path") or scfg.sae_id)
    return scfg.sae_id


def check_target(cfg: ExperimentConfig, target: TargetKey, hf_name: str, d_model: int,
                 handle: SaeHandle | None = None, saes: SaeCache | None = None) -> Any:
    """Fail fast (before any forward pass) when the SAE cannot read this model's layer.

    A local SAE not trained yet is compatible by construction (it will be trained on this layer)."""
    scfg = sae_config(cfg, target)
    if scfg.origin == "train" and handle is None:
        return None
    info = sae_info(load_target_sae(cfg, target, handle, saes), hint=registry_hint(cfg, target))
    try:
        from mosaic_dag.lm.vlm import sae_model_name

        check_compatible(info, sae_model_name(hf_name), d_model, target.layer)  # PaliGemma: its Gemma text model
    except SaeMismatchError as err:
        raise SaeMismatchError(f"sae {target.sae!r}: {err}") from None
    return info

