"""The hidden-state step: residual streams of every configured (model, layer) for one dataset partition.

    <data_dir>/hidden/<model>/L<layer>/<cache key>/   (shards + manifest.json; see mosaic_dag.paths)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.data.step import read_frame
from mosaic_dag.handles import DatasetHandle, HiddenHandle, UpstreamMissing
from mosaic_dag.lm.extract import ExtractionStats, HiddenCache, check_layers, extract_to_cache
from mosaic_dag.lm.models import LoadedModel, default_batch_tokens, fingerprint, load_named_model
from mosaic_dag.paths import hidden_dir, hidden_key

log = logging.getLogger(__name__)


@dataclass
class ModelExtraction:
    """What one model's pass did for a dataset partition."""

    model: str
    cache_hit: bool
    stats: ExtractionStats | None
    layers_computed: list[int]


@dataclass
class HiddenResult:
    handle: HiddenHandle
    models: list[ModelExtraction]

    @property
    def cache_hit(self) -> bool:
        return all(m.cache_hit for m in self.models)

    @property
    def forward_calls(self) -> int:
        return sum(m.stats.forward_calls for m in self.models if m.stats)


def build_hidden_states(
    cfg: ExperimentConfig,
    data: DatasetHandle,
    *,
    loader: Callable[[str], LoadedModel] | None = None,
    progress: Callable[[int, int], None] | None = None,
    show_bar: bool = False,
    preflight: Callable[[str], None] | None = None,
    verify: bool = True,
) -> HiddenResult:
    """Hidden states of every configured (model, layer) for one dataset partition, cached.

    One forward pass per model serves all of its configured layers; layers already cached (checksums
    verified when ``verify``) are not recomputed, and a model whose layers are all cached is not even
    loaded. ``preflight(model)`` runs before that model's load or forward pass (the SAE/model check).
    """
    from mosaic_dag.lm import vlm
    frame = read_frame(data)
    dataset, _, language = data.key.partition(".")
    dcfg = cfg.dataset(dataset)
    rows_hash = vlm.partition_hash(dcfg, frame, data.content_hash)  # images: prompt and token choice too
    caches: dict[str, str] = {}
    done: list[ModelExtraction] = []
    for mcfg in cfg.models:
        fingerprint = model_fingerprint(cfg, mcfg.name)
        folders = {layer: hidden_dir(cfg, mcfg.name, layer, hidden_key(fingerprint, layer, rows_hash, mcfg.max_length)) for layer in mcfg.layers}
        caches |= {f"{mcfg.name}.L{layer}": str(folder) for layer, folder in folders.items()}
        todo = {layer: f for layer, f in folders.items() if not HiddenCache(f).is_valid(deep=verify)}
        if not todo:
            done.append(ModelExtraction(mcfg.name, True, None, []))
            continue
        if preflight is not None:
            preflight(mcfg.name)
        for folder in todo.values():
            if folder.exists():
                log.warning("hidden-state cache %s failed its checksum; recomputing", folder)
                shutil.rmtree(folder, ignore_errors=True)
        loaded = loader(mcfg.name) if loader else load_named_model(cfg, mcfg.name)
        check_layers(loaded, mcfg.layers)
        if loaded.fingerprint != fingerprint:  # the weights on disk moved under the config's name
            todo = {layer: hidden_dir(cfg, mcfg.name, layer, hidden_key(loaded.fingerprint, layer, rows_hash, mcfg.max_length)) for layer in todo}
            caches |= {f"{mcfg.name}.L{layer}": str(folder) for layer, folder in todo.items()}
        extra = {"dataset": dataset, "language": language, "dataset_hash": data.content_hash,
                 "ids_head": frame["id"].head(3).tolist()}
        batch_tokens = mcfg.batch_tokens or default_batch_tokens(loaded.device)
        if "image" in frame.columns:  # an image partition: processor inputs, the dataset's token selection
            stats = vlm.extract_images_to_cache(
                loaded, frame["image"].tolist(), sorted(todo), todo, prompt_template=dcfg.prompt_template,
                tokens=dcfg.token_selection, max_length=mcfg.max_length, batch_tokens=batch_tokens,
                extra_manifest=extra, progress=progress)
        else:
            stats = extract_to_cache(
                loaded, frame["text"].tolist(), sorted(todo), todo, max_length=mcfg.max_length,
                batch_tokens=batch_tokens, extra_manifest=extra, progress=progress, show_bar=show_bar,
            )
        done.append(ModelExtraction(mcfg.name, False, stats, sorted(todo)))
    return HiddenResult(HiddenHandle(dataset=asdict(data), caches=caches), done)


def hidden_cache(hidden: HiddenHandle, model: str, layer: int) -> HiddenCache:
    """The cache of one (model, layer) inside a hidden_states handle; size-checked, not re-hashed."""
    cache = HiddenCache(hidden.cache(model, layer))
    if not cache.is_valid(deep=False):
        raise UpstreamMissing(f"hidden_states partition {hidden.data.key!r}: cache {cache.path} is missing or "
                              "incomplete; re-materialize hidden_states for it")
    return cache


def model_fingerprint(cfg: ExperimentConfig, model: str) -> str:
    """The cache-key fingerprint, without loading weights (so a cache hit costs no model load)."""
    return fingerprint(cfg.model(model))
