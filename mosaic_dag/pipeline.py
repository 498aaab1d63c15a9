"""The steps the assets run, as plain functions over the config (testable without Dagster).

Artifacts live at deterministic paths under the config's data folder, so any step can find its
inputs from the config and the partition key alone:

    <data_dir>/datasets/<dataset>/<language>.parquet
    <data_dir>/hidden/<model>/L<layer>/<cache key>/        (shards + manifest.json)
    $MOSAIC_CACHE/models/  (default ~/.cache/mosaic)         (converted model snapshots)
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mosaic_dag import datasets as ds
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import DatasetError
from mosaic_dag.extract import ExtractionStats, HiddenCache, cache_key, check_layers, extract_to_cache
from mosaic_dag.models import LoadedModel, default_batch_tokens, fingerprint, load_model
from mosaic_dag.storage import write_parquet

log = logging.getLogger(__name__)


def models_dir(cfg: ExperimentConfig) -> Path:
    """Converted model snapshots are shared by every experiment on this machine ($MOSAIC_CACHE)."""
    root = os.environ.get("MOSAIC_CACHE") or Path.home() / ".cache" / "mosaic"
    return Path(root) / "models"


def dataset_file(cfg: ExperimentConfig, dataset: str, language: str) -> Path:
    return cfg.data_path / "datasets" / dataset / f"{language}.parquet"


@dataclass
class DatasetResult:
    path: Path
    frame: pd.DataFrame
    content_hash: str


def behaviour_model(cfg: ExperimentConfig, name: str) -> LoadedModel:
    """The behaviour TARGET model: a configured model by name, else any id/folder/bundled model."""
    from mosaic_dag.config import ModelConfig

    known = {m.name: m for m in cfg.models}
    mcfg = known.get(name) or ModelConfig(name="behaviour-target", id=name, layers=[0])
    return load_model(mcfg, models_dir(cfg))


def with_behaviour_labels(cfg: ExperimentConfig, dataset: str, language: str, raw: pd.DataFrame) -> pd.DataFrame:
    """Add a ``__behaviour`` column: what the target model did on each text (see mosaic_dag.behaviour)."""
    from mosaic_dag.behaviour import KeywordJudge, ModelJudge, behaviour_labels

    dcfg = cfg.dataset(dataset)
    b = dcfg.behaviour
    assert b is not None
    if dcfg.language_field:
        raw = raw[raw[dcfg.language_field].astype(str) == language].reset_index(drop=True)
    if dcfg.text_field not in raw.columns:
        raise DatasetError(f"dataset {dataset!r}: text_field {dcfg.text_field!r} is not a column")
    target = behaviour_model(cfg, b.model)
    texts = raw[dcfg.text_field].astype(str).tolist()
    options = answers = None
    judge = None
    if b.task == "choice":
        if b.answer_field not in raw.columns:
            raise DatasetError(f"dataset {dataset!r}: behaviour.answer_field {b.answer_field!r} is not a column")
        gold = raw[b.answer_field].astype(str).tolist()
        mapping = b.answer_map or {str(i): i for i in range(len(b.options or []))}
        unknown = sorted(set(gold) - set(mapping))
        if unknown:
            raise DatasetError(f"dataset {dataset!r}: behaviour.answer_map has no entry for {unknown[:5]}; add them")
        options = [list(b.options or [])] * len(texts)
        answers = [mapping[g] for g in gold]
    elif b.judge == "model":
        judge_m = behaviour_model(cfg, str(b.judge_model))
        judge = ModelJudge(judge_m.model, judge_m.tokenizer)
    else:
        judge = KeywordJudge(b.refusal_patterns) if b.refusal_patterns else KeywordJudge()
    labels = behaviour_labels(
        target.model, target.tokenizer, texts, task=b.task, prompt_template=b.prompt_template, judge=judge,
        options=options, answers=answers, chat=b.chat, max_new_tokens=b.max_new_tokens, batch_size=b.batch_size,
    )
    out = raw.copy()
    out["__behaviour"] = labels["label_name"].to_numpy()
    out.attrs = dict(raw.attrs)
    return out


def build_dataset(cfg: ExperimentConfig, dataset: str, language: str) -> DatasetResult:
    """Read, normalise and write one (dataset, language) parquet atomically."""
    dcfg = cfg.dataset(dataset)
    if language not in cfg.dataset_languages(dataset):
        raise DatasetError(f"dataset {dataset!r} has no language {language!r} in the config; add it to 'languages'")
    if dcfg.behaviour is not None:
        raw = with_behaviour_labels(cfg, dataset, language, ds.read_source(dcfg, cfg.base_dir, language))
        frame = ds.normalise(raw, dcfg.model_copy(update={"label_field": "__behaviour", "label_names": None}),
                             language, cfg.split)
    else:
        frame = ds.load_dataset(dcfg, language, cfg.split, cfg.base_dir)
    path = dataset_file(cfg, dataset, language)
    write_parquet(path, frame)
    return DatasetResult(path, frame, ds.content_hash(frame))


def read_dataset(cfg: ExperimentConfig, dataset: str, language: str) -> DatasetResult:
    path = dataset_file(cfg, dataset, language)
    if not path.exists():
        raise DatasetError(
            f"dataset {dataset}.{language} is not materialized yet ({path}); materialize the 'dataset' asset first"
        )
    frame = pd.read_parquet(path)
    return DatasetResult(path, frame, ds.content_hash(frame))


def hidden_dir(cfg: ExperimentConfig, model: str, layer: int, fingerprint: str, dataset_hash: str) -> Path:
    mcfg = cfg.model(model)
    key = cache_key(fingerprint, layer, dataset_hash, mcfg.max_length)
    return cfg.data_path / "hidden" / model / f"L{layer}" / key


@dataclass
class HiddenResult:
    cache: HiddenCache
    hit: bool
    stats: ExtractionStats | None
    layers_computed: list[int]


def get_model(cfg: ExperimentConfig, model: str) -> LoadedModel:
    return load_model(cfg.model(model), models_dir(cfg))


def build_hidden(
    cfg: ExperimentConfig,
    model: str,
    layer: int,
    dataset: str,
    language: str,
    *,
    loader: Callable[[], LoadedModel] | None = None,
    progress: Callable[[int, int], None] | None = None,
    show_bar: bool = False,
    preflight: Callable[[], None] | None = None,
    verify: bool = True,
) -> HiddenResult:
    """Hidden states of one layer for one dataset partition, from the cache when it is there.

    On a miss, every configured layer of this model that is missing for this dataset is computed in
    the same forward pass, so the next layer's partition is a cache hit. ``preflight`` runs before
    any model load or forward pass (e.g. the SAE/model compatibility check). ``verify`` re-hashes every
    shard (the hidden_states asset does); downstream steps pass False and only check sizes, so the
    cache is not read twice per step.
    """
    mcfg = cfg.model(model)
    if layer not in mcfg.layers:
        raise DatasetError(f"layer {layer} is not configured for model {model!r}; add it to models[{model}].layers")
    data = read_dataset(cfg, dataset, language)
    from mosaic_dag import vlm

    rows_hash = vlm.partition_hash(cfg.dataset(dataset), data.frame, data.content_hash)
    fingerprint = model_fingerprint(cfg, model)
    target = HiddenCache(hidden_dir(cfg, model, layer, fingerprint, rows_hash))
    if target.is_valid(deep=verify):
        return HiddenResult(target, True, None, [])
    if preflight is not None:
        preflight()
    if target.path.exists():
        log.warning("hidden-state cache %s failed its checksum; recomputing", target.path)
        shutil.rmtree(target.path, ignore_errors=True)
    loaded = loader() if loader else get_model(cfg, model)
    check_layers(loaded, mcfg.layers)
    todo = {}
    for other in mcfg.layers:
        folder = hidden_dir(cfg, model, other, loaded.fingerprint, rows_hash)
        if other == layer or not HiddenCache(folder).is_valid(deep=False):
            todo[other] = folder
    extra = {"dataset": dataset, "language": language, "dataset_hash": data.content_hash,
             "ids_head": data.frame["id"].head(3).tolist()}
    batch_tokens = mcfg.batch_tokens or default_batch_tokens(loaded.device)
    if "image" in data.frame.columns:  # an image partition: processor inputs, the dataset's token selection
        dcfg = cfg.dataset(dataset)
        stats = vlm.extract_images_to_cache(
            loaded, data.frame["image"].tolist(), sorted(todo), todo, prompt_template=dcfg.prompt_template,
            tokens=dcfg.token_selection, max_length=mcfg.max_length, batch_tokens=batch_tokens,
            extra_manifest=extra, progress=progress)
    else:
        stats = extract_to_cache(
            loaded, data.frame["text"].tolist(), sorted(todo), todo, max_length=mcfg.max_length,
            batch_tokens=batch_tokens, extra_manifest=extra, progress=progress, show_bar=show_bar,
        )
    return HiddenResult(HiddenCache(todo[layer]), False, stats, sorted(todo))


def model_fingerprint(cfg: ExperimentConfig, model: str) -> str:
    """The cache-key fingerprint, without loading weights (so a cache hit costs no model load)."""
    return fingerprint(cfg.model(model))
