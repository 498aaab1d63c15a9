"""The SAE step: train a target's SAE here on its training partitions (or reuse it), else load and check it.

Takes its inputs as handles (mosaic_dag.handles) and never rebuilds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import ConfigError
from mosaic_dag.handles import DatasetHandle, HiddenHandle, SaeHandle, UpstreamMissing
from mosaic_dag.keys import TargetKey
from mosaic_dag.data.step import read_frame
from mosaic_dag.lm.hidden_states import hidden_cache
from mosaic_dag.sae.compat import check_compatible, sae_info
from mosaic_dag.sae.integrity import discard_if_corrupt
from mosaic_dag.sae.resolve import (
    SaeCache,
    load_target_sae,
    registry_hint,
    sae_config,
    sae_spec,
    spec_identity,
    trained_dir,
    training_identity,
    training_partitions,
)
from mosaic_dag.sae.spec import SaeMismatchError
from mosaic_dag.sae.training import read_training_metrics, train_sae


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
              hidden: Mapping[str, HiddenHandle | None], data: Mapping[str, DatasetHandle | None],
              saes: SaeCache | None = None) -> SaeResult:
    """Resolve the target's SAE: train it here on its training partitions (or reuse), else load and check it.

    ``hidden``/``data``: the upstream handles by dataset partition key (None where not materialized);
    only a local SAE reads them, and only those of its ``training_partitions``. ``saes``: where loaded
    SAEs are held."""
    scfg = sae_config(cfg, target)
    if scfg.origin != "train":
        info = sae_info(load_target_sae(cfg, target, saes=saes), hint=registry_hint(cfg, target))
        spec = sae_spec(cfg, target)
        handle = SaeHandle(target=target.key, origin=scfg.origin, identity=spec_identity(spec), path=spec.path,
                           release=scfg.release, sae_id=scfg.sae_id, width=int(info.width),
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
    if discard_if_corrupt(folder) and saes is not None:  # failed its checksums: removed, trained again below
        saes.forget(folder)

    def handle_of(info: Any) -> SaeHandle:
        return SaeHandle(target=target.key, origin="train", identity=f"trained:{folder.name}", path=str(folder),
                         width=int(info.width), architecture=str(info.architecture), training_data=sorted(ids))

    if (folder / "cfg.json").exists():
        info = sae_info(load_target_sae(cfg, target, SaeHandle(target.key, "train", "", str(folder)), saes))
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
    if saes is not None:  # the folder's weights are new: nothing held under its old identity is used again
        saes.forget(folder)
    metrics = dict(trained.metrics)
    metrics.setdefault("unique_train_tokens", len(acts))
    probe = SaeHandle(target.key, "train", "", str(trained.path))
    info = sae_info(load_target_sae(cfg, target, probe, saes))
    return SaeResult(handle_of(info), info, metrics, False)

