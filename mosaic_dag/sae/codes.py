"""SAEs and their codes over the hidden-state caches: resolve or train an SAE, encode, store sparse.

Each step takes its inputs as handles (mosaic_dag.handles) and never rebuilds them.

    <data_dir>/saes/<model>/L<layer>/<sae>-<key>/          trained SAEs (sae-lens format)
    <data_dir>/codes/<model>/L<layer>/<sae>/<key>/         shard-*.npz (CSR) + manifest.json
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosaic_dag.config import ExperimentConfig, SaeConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.handles import CodesHandle, DatasetHandle, HiddenHandle, SaeHandle, UpstreamMissing
from mosaic_dag.paths import codes_dir, trained_sae_dir
from mosaic_dag.keys import TargetKey, dataset_keys
from mosaic_dag.data.step import read_frame
from mosaic_dag.lm.hidden_states import hidden_cache, model_fingerprint
from mosaic_dag.storage import atomic_dir, stable_hash

log = logging.getLogger(__name__)
_SAES: dict[str, Any] = {}
_LOCK = threading.Lock()


def sae_config(cfg: ExperimentConfig, target: TargetKey) -> SaeConfig:
    """The config's SAE for this target, or a registry SAE that the release sensor added by key."""
    mcfg = cfg.model(target.model)
    for sae in mcfg.saes:
        if sae.label == target.sae:
            return sae
    from mosaic_dag.sae.core import default_sae_name
    from mosaic_dag.sae.registry import matching_saes, read_registry

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
    from mosaic_dag.sae.training import RECIPE_VERSION

    scfg = sae_config(cfg, target)
    identity = {"model": model_fingerprint(cfg, target.model), "layer": target.layer,
                "sae": scfg.model_dump(exclude={"train_on"}), "data": sorted(training), "recipe": RECIPE_VERSION,
                "max_length": cfg.model(target.model).max_length}
    return trained_sae_dir(cfg, target, identity)


def sae_spec(cfg: ExperimentConfig, target: TargetKey, trained: Path | str | None = None) -> Any:
    """The SaeSpec to load this target's SAE (a trained one points at its folder, ``trained``)."""
    from mosaic_dag.sae.core import SaeSpec

    scfg = sae_config(cfg, target)
    if scfg.origin == "train":
        if trained is None:
            raise UpstreamMissing(f"sae {target.key!r} is trained here and not materialized yet; "
                                  "materialize the 'sae' asset for it first")
        return SaeSpec(source="local", path=str(trained), name=target.sae)
    path = str(cfg.resolve(scfg.path)) if scfg.path else None
    return SaeSpec(source=scfg.origin, release=scfg.release, sae_id=scfg.sae_id, path=path, name=target.sae)


def spec_identity(spec: Any) -> str:
    """Registry id, or the local folder plus its weights' size and time: what the codes are keyed on."""
    if spec.source == "registry":
        return f"registry:{spec.release}/{spec.sae_id}"
    weights = Path(spec.path) / "sae_weights.safetensors"
    stamp = [weights.stat().st_size, int(weights.stat().st_mtime)] if weights.exists() else "absent"
    return f"local:{spec.path}@{stable_hash(stamp)}"


def load_target_sae(cfg: ExperimentConfig, target: TargetKey, handle: SaeHandle | None = None) -> Any:
    """Load (or reuse from this process) the target's SAE; a trained one from its handle's folder."""
    from mosaic_dag.sae.core import load_sae

    spec = sae_spec(cfg, target, handle.path if handle is not None and handle.origin == "train" else None)
    ident = spec_identity(spec)
    with _LOCK:
        if ident not in _SAES:
            _SAES[ident] = load_sae(spec)
        return _SAES[ident]


def forget_saes() -> None:
    with _LOCK:
        _SAES.clear()


def registry_hint(cfg: ExperimentConfig, target: TargetKey) -> str | None:
    scfg = sae_config(cfg, target)
    if scfg.origin != "registry":
        return None
    from mosaic_dag.sae.registry import read_registry

    for entry in read_registry().get(scfg.release, {}).get("saes", []):
        if entry.get("id") == scfg.sae_id:
            return str(entry.get("path") or scfg.sae_id)
    return scfg.sae_id


def check_target(cfg: ExperimentConfig, target: TargetKey, hf_name: str, d_model: int,
                 handle: SaeHandle | None = None) -> Any:
    """Fail fast (before any forward pass) when the SAE cannot read this model's layer.

    A local SAE not trained yet is compatible by construction (it will be trained on this layer)."""
    from mosaic_dag.sae.core import SaeMismatchError, check_compatible, sae_info

    scfg = sae_config(cfg, target)
    if scfg.origin == "train" and handle is None:
        return None
    info = sae_info(load_target_sae(cfg, target, handle), hint=registry_hint(cfg, target))
    try:
        from mosaic_dag.lm.vlm import sae_model_name

        check_compatible(info, sae_model_name(hf_name), d_model, target.layer)  # PaliGemma: its Gemma text model
    except SaeMismatchError as err:
        raise SaeMismatchError(f"sae {target.sae!r}: {err}") from None
    return info


# --------------------------------------------------------------------------- training


@dataclass
class SaeResult:
    handle: SaeHandle
    info: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = True
    mismatch: str | None = None  # why the SAE cannot read this model's layer (a blocking check fails)


def _train_tokens(target: TargetKey, training: Mapping[str, tuple[HiddenHandle, DatasetHandle]], limit: int,
                  seed: int, split_name: str = "train", exclude: set[str] | None = None) -> np.ndarray:
    """Real-token activations of one split's texts (TRAIN to train on) from the training partitions' caches.

    ``exclude``: texts to leave out (held-out tokens must not be a train text of another partition).
    """
    chunks: list[np.ndarray] = []
    total = 0
    for key in sorted(training):
        hidden, data = training[key]
        cache = hidden_cache(hidden, target.model, target.layer)
        frame = read_frame(data)
        wanted = (frame["split"].to_numpy() == split_name) & ~frame["text"].isin(exclude or set()).to_numpy()
        for shard in cache.iter_shards():
            keep_text = wanted[shard.rows]
            token_keep = np.repeat(keep_text, np.diff(shard.offsets)) & shard.real_mask
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


def build_sae(cfg: ExperimentConfig, target: TargetKey, hf_name: str, d_model: int,
              hidden: Mapping[str, HiddenHandle | None], data: Mapping[str, DatasetHandle | None]) -> SaeResult:
    """Resolve the target's SAE: train it here on its training partitions (or reuse), else load and check it.

    ``hidden``/``data``: the upstream handles by dataset partition key (None where not materialized);
    only a local SAE reads them, and only those of its ``training_partitions``."""
    from mosaic_dag.sae.core import SaeMismatchError, check_compatible, discard_if_corrupt, sae_info
    from mosaic_dag.sae.training import read_training_metrics, train_sae

    scfg = sae_config(cfg, target)
    if scfg.origin != "train":
        info = sae_info(load_target_sae(cfg, target), hint=registry_hint(cfg, target))
        spec = sae_spec(cfg, target)
        handle = SaeHandle(target=target.key, origin=scfg.origin, identity=spec_identity(spec), path=spec.path,
                           release=scfg.release, sae_id=scfg.sae_id, width=int(info.d_sae),
                           architecture=str(info.architecture))
        try:
            from mosaic_dag.lm.vlm import sae_model_name

            check_compatible(info, sae_model_name(hf_name), d_model, target.layer)  # PaliGemma: its text model
            mismatch = None
        except SaeMismatchError as err:
            mismatch = f"sae {target.sae!r}: {err}"
        return SaeResult(handle, info, {}, True, mismatch)
    keys = training_partitions(cfg, scfg)
    missing = [k for k in keys if hidden.get(k) is None or data.get(k) is None]
    if missing:
        raise UpstreamMissing(f"sae {target.key!r} trains on hidden_states {missing} which are not materialized; "
                              "materialize 'dataset' and 'hidden_states' for them first")
    training = {k: (hidden[k], data[k]) for k in keys}
    ids = [training_identity(h, d, target.model, target.layer) for h, d in training.values()]  # type: ignore[arg-type]
    folder = trained_dir(cfg, target, ids)
    if discard_if_corrupt(folder):  # failed its checksums: removed, trained again below
        forget_saes()

    def handle_of(info: Any) -> SaeHandle:
        return SaeHandle(target=target.key, origin="train", identity=f"trained:{folder.name}", path=str(folder),
                         width=int(info.d_sae), architecture=str(info.architecture), training_data=sorted(ids))

    if (folder / "cfg.json").exists():
        info = sae_info(load_target_sae(cfg, target, SaeHandle(target.key, "train", "", str(folder))))
        return SaeResult(handle_of(info), info, read_training_metrics(folder) or {}, True)
    acts = _train_tokens(target, training, limit=max(scfg.training_tokens, scfg.batch_size), seed=scfg.seed)  # type: ignore[arg-type]
    batch = min(scfg.batch_size, max(16, len(acts) // 4))
    train_texts: set[str] = set()
    for _, d in training.values():
        frame = read_frame(d)  # type: ignore[arg-type]
        train_texts.update(frame.loc[frame["split"] == "train", "text"].tolist())
    held_out = _train_tokens(target, training, limit=50_000, seed=scfg.seed, split_name="validation",  # type: ignore[arg-type]
                             exclude=train_texts)  # scored, never trained on
    trained = train_sae(
        acts, hook_name=f"model.layers.{target.layer}", model_name=hf_name, out_dir=folder,
        training_tokens=scfg.training_tokens, architecture=scfg.architecture, width=scfg.width, k=scfg.k,
        lr=scfg.lr, batch_size=batch, seed=scfg.seed, layer=target.layer, held_out=held_out if held_out.size else None,
    )
    forget_saes()
    metrics = dict(trained.metrics)
    metrics.setdefault("unique_train_tokens", len(acts))
    probe = SaeHandle(target.key, "train", "", str(trained.path))
    info = sae_info(load_target_sae(cfg, target, probe))
    return SaeResult(handle_of(info), info, metrics, False)


# --------------------------------------------------------------------------- codes


@dataclass
class CodesResult:
    path: Path
    hit: bool
    manifest: dict[str, Any]
    handle: CodesHandle


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
        from mosaic_dag.sae.core import load_codes

        for s in self.manifest()["shards"]:
            yield load_codes(self.path / s["file"])


def build_codes(
    cfg: ExperimentConfig, target: TargetKey, sae_handle: SaeHandle, hidden_handle: HiddenHandle,
    progress: Callable[[int, int], None] | None = None,
) -> CodesResult:
    """Encode one dataset partition's cached hidden states, shard by shard, into sparse codes."""
    from mosaic_dag.sae.core import check_reconstruction, discard_if_corrupt, encode_sparse, encode_stats, sae_info, save_codes

    hidden = hidden_cache(hidden_handle, target.model, target.layer)
    hman = hidden.manifest()
    data = hidden_handle.data
    dataset, _, language = data.key.partition(".")
    if sae_handle.origin == "train" and sae_handle.path and discard_if_corrupt(Path(sae_handle.path)):
        forget_saes()
        raise UpstreamMissing(f"sae {target.key!r}: the trained SAE at {sae_handle.path} failed its checksums and "
                              "was removed; re-materialize the 'sae' asset for it")
    check_target(cfg, target, hman["hf_name"], hman["d_model"], handle=sae_handle)
    out = CodesStore(codes_dir(cfg, target, hidden.path.name, sae_handle.identity))
    if out.is_valid():
        return CodesResult(out.path, True, out.manifest(), _codes_handle(out.path, hidden_handle, sae_handle))
    sae = load_target_sae(cfg, target, sae_handle)
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
            check_reconstruction(target.sae, codes, stats)  # corrupt or mismatched weights: stop, name the SAE
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
            "model": target.model, "layer": target.layer, "sae": target.sae, "sae_identity": sae_handle.identity,
            "width": width, "architecture": info.architecture, "signed": bool(info.signed),
            "neuronpedia_id": info.neuronpedia_id, "dataset": dataset, "language": language,
            "hidden_cache": str(hidden.path), "tokens": int(hman["tokens"]), "real_tokens": real_tokens,
            "mean_l0": l0_sum / max(1, real_tokens), "dead_fraction": float(1 - active.mean()),
            "explained_variance": ev_weighted / max(1, real_tokens),
            "bytes": sum(s["bytes"] for s in shards), "dense_fp16_bytes": int(hman["tokens"]) * width * 2,
            "seconds": time.perf_counter() - t0, "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return CodesResult(out.path, False, manifest, _codes_handle(out.path, hidden_handle, sae_handle))


def _codes_handle(path: Path, hidden: HiddenHandle, sae: SaeHandle) -> CodesHandle:
    return CodesHandle(path=str(path), hidden=asdict(hidden), sae=asdict(sae))

