"""SAEs and their codes over the hidden-state caches: resolve or train an SAE, encode, store sparse.

    <data_dir>/saes/<model>/L<layer>/<sae>-<key>/          trained SAEs (sae-lens format)
    <data_dir>/codes/<model>/L<layer>/<sae>/<key>/         shard-*.npz (CSR) + manifest.json
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosaic_dag.config import ExperimentConfig, SaeConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.extract import HiddenCache
from mosaic_dag.partitions import Target, dataset_keys
from mosaic_dag.pipeline import build_hidden, dataset_file, model_fingerprint, read_dataset
from mosaic_dag.storage import atomic_dir, stable_hash

log = logging.getLogger(__name__)
_SAES: dict[str, Any] = {}
_LOCK = threading.Lock()


def sae_config(cfg: ExperimentConfig, target: Target) -> SaeConfig:
    """The config's SAE for this target, or a registry SAE that the release sensor added by key."""
    mcfg = cfg.model(target.model)
    for sae in mcfg.saes:
        if sae.label == target.sae:
            return sae
    from mosaic_dag.sae import default_sae_name
    from mosaic_dag.sae_registry import matching_saes, read_registry

    for entry in matching_saes(read_registry(), [mcfg.id], {mcfg.id: [target.layer]}):
        if default_sae_name("registry", entry.release, entry.sae_id) == target.sae:
            return SaeConfig(source="registry", release=entry.release, sae_id=entry.sae_id, name=target.sae)
    raise ConfigError(f"sae {target.sae!r} is not configured for model {target.model!r}; known: {[s.label for s in mcfg.saes]}")


def _dataset_hashes(cfg: ExperimentConfig) -> list[str]:
    """Contents and train split of every dataset partition: what an SAE trained here saw."""
    out = []
    for key in dataset_keys(cfg):
        if not dataset_file(cfg, key.dataset, key.language).exists():
            out.append(f"missing:{key.key}")
            continue
        data = read_dataset(cfg, key.dataset, key.language)
        out.append(stable_hash([data.content_hash, (data.frame["split"] == "train").to_numpy().tobytes().hex()]))
    return out


def trained_dir(cfg: ExperimentConfig, target: Target) -> Path:
    """Folder of a locally trained SAE: keyed by model weights, layer, SAE settings and training data."""
    from mosaic_dag.sae_training import RECIPE_VERSION

    scfg = sae_config(cfg, target)
    key = stable_hash({"model": model_fingerprint(cfg, target.model), "layer": target.layer,
                       "sae": scfg.model_dump(), "data": _dataset_hashes(cfg), "recipe": RECIPE_VERSION,
                       "max_length": cfg.model(target.model).max_length})
    return cfg.data_path / "saes" / target.model / f"L{target.layer}" / f"{target.sae}-{key}"


def sae_spec(cfg: ExperimentConfig, target: Target) -> Any:
    """The SaeSpec to load this target's SAE (a trained one points at its folder)."""
    from mosaic_dag.sae import SaeSpec

    scfg = sae_config(cfg, target)
    if scfg.source == "train":
        return SaeSpec(source="local", path=str(trained_dir(cfg, target)), name=target.sae)
    path = str(cfg.resolve(scfg.path)) if scfg.path else None
    return SaeSpec(source=scfg.source, release=scfg.release, sae_id=scfg.sae_id, path=path, name=target.sae)


def sae_identity(cfg: ExperimentConfig, target: Target) -> str:
    spec = sae_spec(cfg, target)
    if spec.source == "registry":
        return f"registry:{spec.release}/{spec.sae_id}"
    weights = Path(spec.path) / "sae_weights.safetensors"
    stamp = [weights.stat().st_size, int(weights.stat().st_mtime)] if weights.exists() else "absent"
    return f"local:{spec.path}@{stable_hash(stamp)}"


def get_sae(cfg: ExperimentConfig, target: Target) -> Any:
    """Load (or reuse from this process) the target's SAE."""
    from mosaic_dag.sae import load_sae

    ident = sae_identity(cfg, target)
    with _LOCK:
        if ident not in _SAES:
            _SAES[ident] = load_sae(sae_spec(cfg, target))
        return _SAES[ident]


def forget_saes() -> None:
    with _LOCK:
        _SAES.clear()


def registry_hint(cfg: ExperimentConfig, target: Target) -> str | None:
    scfg = sae_config(cfg, target)
    if scfg.source != "registry":
        return None
    from mosaic_dag.sae_registry import read_registry

    for entry in read_registry().get(scfg.release, {}).get("saes", []):
        if entry.get("id") == scfg.sae_id:
            return str(entry.get("path") or scfg.sae_id)
    return scfg.sae_id


def check_target(cfg: ExperimentConfig, target: Target, hf_name: str, d_model: int) -> Any:
    """Fail fast (before any forward pass) when the SAE cannot read this model's layer."""
    from mosaic_dag.sae import check_compatible, sae_info

    scfg = sae_config(cfg, target)
    if scfg.source == "train" and not (trained_dir(cfg, target) / "cfg.json").exists():
        return None  # trained here from this very layer: compatible by construction
    info = sae_info(get_sae(cfg, target), hint=registry_hint(cfg, target))
    from mosaic_dag.sae import SaeMismatchError

    try:
        check_compatible(info, hf_name, d_model, target.layer)
    except SaeMismatchError as err:
        raise SaeMismatchError(f"sae {target.sae!r}: {err}") from None
    return info


# --------------------------------------------------------------------------- training


@dataclass
class SaeResult:
    path: Path | None
    info: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    reused: bool = True


def _train_tokens(cfg: ExperimentConfig, target: Target, limit: int, seed: int, split_name: str = "train",
                  exclude: set[str] | None = None) -> np.ndarray:
    """Real-token activations of one split's texts (TRAIN to train on), from every configured dataset's cache.

    ``exclude``: texts to leave out (held-out tokens must not be a train text of another dataset).
    """
    chunks: list[np.ndarray] = []
    total = 0
    for key in dataset_keys(cfg):
        hidden = build_hidden(cfg, target.model, target.layer, key.dataset, key.language, verify=False).cache
        frame = read_dataset(cfg, key.dataset, key.language).frame
        split = frame["split"].to_numpy()
        wanted = (split == split_name) & ~frame["text"].isin(exclude or set()).to_numpy()
        for shard in hidden.iter_shards():
            keep_text = wanted[shard.rows]
            lengths = np.diff(shard.offsets)
            token_keep = np.repeat(keep_text, lengths) & shard.real_mask
            part = shard.acts[token_keep].astype(np.float32)
            chunks.append(part)
            total += len(part)
    if (not chunks or total == 0) and split_name != "train":
        return np.zeros((0, 0), dtype=np.float32)
    if not chunks or total == 0:
        raise ConfigError(f"sae {target.sae!r}: no train tokens to train on; check the datasets' train splits")
    acts = np.concatenate(chunks)
    if len(acts) > limit:
        acts = acts[np.sort(np.random.default_rng(seed).choice(len(acts), limit, replace=False))]
    return acts


def build_sae(cfg: ExperimentConfig, target: Target, hf_name: str, d_model: int) -> SaeResult:
    """Resolve the target's SAE: train it here when the config says so (or reuse), else load and check it."""
    from mosaic_dag.sae import sae_info
    from mosaic_dag.sae_training import read_training_metrics, train_sae

    scfg = sae_config(cfg, target)
    if scfg.source != "train":
        info = check_target(cfg, target, hf_name, d_model)
        return SaeResult(Path(scfg.path) if scfg.path else None, info, {}, True)
    folder = trained_dir(cfg, target)
    if (folder / "cfg.json").exists():
        return SaeResult(folder, sae_info(get_sae(cfg, target)), read_training_metrics(folder) or {}, True)
    acts = _train_tokens(cfg, target, limit=max(scfg.training_tokens, scfg.batch_size), seed=scfg.seed)
    batch = min(scfg.batch_size, max(16, len(acts) // 4))
    train_texts: set[str] = set()
    for key in dataset_keys(cfg):
        frame = read_dataset(cfg, key.dataset, key.language).frame
        train_texts.update(frame.loc[frame["split"] == "train", "text"].tolist())
    held_out = _train_tokens(cfg, target, limit=50_000, seed=scfg.seed, split_name="validation",
                             exclude=train_texts)  # scored, never trained on
    trained = train_sae(
        acts, hook_name=f"model.layers.{target.layer}", model_name=hf_name, out_dir=folder,
        training_tokens=scfg.training_tokens, architecture=scfg.architecture, width=scfg.width, k=scfg.k,
        lr=scfg.lr, batch_size=batch, seed=scfg.seed, layer=target.layer, held_out=held_out if held_out.size else None,
    )
    forget_saes()
    metrics = dict(trained.metrics)
    metrics.setdefault("unique_train_tokens", len(acts))
    return SaeResult(trained.path, sae_info(get_sae(cfg, target)), metrics, False)


# --------------------------------------------------------------------------- codes


@dataclass
class CodesResult:
    path: Path
    hit: bool
    manifest: dict[str, Any]


class CodesStore:
    """A folder of per-shard sparse codes written by ``build_codes``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    def is_valid(self) -> bool:
        try:
            man = self.manifest()
        except (OSError, json.JSONDecodeError):
            return False
        return all((self.path / s["file"]).exists() and (self.path / s["file"]).stat().st_size == s["bytes"]
                   for s in man["shards"])

    def iter_shards(self) -> Any:
        from mosaic_dag.sae import load_codes

        for s in self.manifest()["shards"]:
            yield load_codes(self.path / s["file"])


def codes_dir(cfg: ExperimentConfig, target: Target, hidden: HiddenCache) -> Path:
    key = stable_hash({"hidden": hidden.path.name, "sae": sae_identity(cfg, target)})
    return cfg.data_path / "codes" / target.model / f"L{target.layer}" / target.sae / key


def build_codes(
    cfg: ExperimentConfig, target: Target, dataset: str, language: str,
    progress: Callable[[int, int], None] | None = None,
) -> CodesResult:
    """Encode one dataset partition's cached hidden states, shard by shard, into sparse codes."""
    from mosaic_dag.sae import encode_sparse, encode_stats, sae_info, save_codes

    hidden = build_hidden(cfg, target.model, target.layer, dataset, language, verify=False).cache
    hman = hidden.manifest()
    if sae_config(cfg, target).source == "train" and not (trained_dir(cfg, target) / "cfg.json").exists():
        build_sae(cfg, target, hman["hf_name"], hman["d_model"])
    check_target(cfg, target, hman["hf_name"], hman["d_model"])
    out = CodesStore(codes_dir(cfg, target, hidden))
    if out.is_valid():
        return CodesResult(out.path, True, out.manifest())
    sae = get_sae(cfg, target)
    info = sae_info(sae, hint=registry_hint(cfg, target))
    width = int(info.d_sae)
    active = np.zeros(width, dtype=bool)
    real_tokens = 0
    l0_sum = 0.0
    ev_weighted = 0.0
    shards = []
    t0 = time.perf_counter()
    n_shards = len(hman["shards"])
    with atomic_dir(out.path) as tmp:
        for i, shard in enumerate(hidden.iter_shards()):
            codes = encode_sparse(sae, shard.acts, real_mask=shard.real_mask)
            stats = encode_stats(sae, shard.acts, codes=codes, real_mask=shard.real_mask)
            n_real = int(shard.real_mask.sum())
            real_rows = codes[np.flatnonzero(shard.real_mask)]
            active[np.unique(real_rows.indices)] = True
            l0_sum += float(np.diff(real_rows.indptr).sum())
            ev_weighted += stats.explained_variance * n_real
            real_tokens += n_real
            name = f"shard-{i:05d}.npz"
            save_codes(tmp / name, codes, shard.offsets, shard.real_mask, shard.rows)
            shards.append({"file": name, "bytes": (tmp / name).stat().st_size, "tokens": int(codes.shape[0]),
                           "nnz": int(codes.nnz)})
            if progress:
                progress(i + 1, n_shards)
        manifest = {
            "model": target.model, "layer": target.layer, "sae": target.sae, "sae_identity": sae_identity(cfg, target),
            "width": width, "architecture": info.architecture, "signed": bool(info.signed),
            "neuronpedia_id": info.neuronpedia_id, "dataset": dataset, "language": language,
            "hidden_cache": str(hidden.path), "tokens": int(hman["tokens"]), "real_tokens": real_tokens,
            "mean_l0": l0_sum / max(1, real_tokens), "dead_fraction": float(1 - active.mean()),
            "explained_variance": ev_weighted / max(1, real_tokens),
            "bytes": sum(s["bytes"] for s in shards), "dense_fp16_bytes": int(hman["tokens"]) * width * 2,
            "seconds": time.perf_counter() - t0, "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return CodesResult(out.path, False, manifest)

