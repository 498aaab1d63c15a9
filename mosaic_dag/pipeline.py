"""The steps the assets run, as plain functions over the config (testable without Dagster).

Artifacts live at deterministic paths under the config's data folder, so any step can find its
inputs from the config and the partition key alone:

    <data_dir>/datasets/<dataset>/<language>.parquet
    <data_dir>/hidden/<model>/L<layer>/<cache key>/        (shards + manifest.json)
    $MOSAIC_CACHE/models/  (default ~/.cache/mosaic)         (converted model snapshots)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from mosaic_dag.data import datasets as ds
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import DatasetError
from mosaic_dag.lm.extract import ExtractionStats, HiddenCache, check_layers, extract_to_cache
from mosaic_dag.paths import dataset_file, hidden_dir, hidden_key, models_dir
from mosaic_dag.handles import DatasetHandle, HiddenHandle, UpstreamMissing
from mosaic_dag.lm.models import LoadedModel, default_batch_tokens, fingerprint, load_model
from mosaic_dag.storage import stable_hash, write_parquet

log = logging.getLogger(__name__)


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
    return load_model(mcfg, models_dir())


def with_behaviour_labels(cfg: ExperimentConfig, dataset: str, language: str, raw: pd.DataFrame) -> pd.DataFrame:
    """Add a ``__behaviour`` column: what the target model did on each text (see mosaic_dag.data.behaviour)."""
    from mosaic_dag.data.behaviour import KeywordJudge, ModelJudge, behaviour_labels

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


def dataset_handle(result: DatasetResult, key: str) -> DatasetHandle:
    frame = result.frame
    splits = stable_hash(frame["split"].astype(str).tolist())
    labels = stable_hash(frame["label"].astype(str).tolist())
    return DatasetHandle(key=key, path=str(result.path), content_hash=result.content_hash, rows=len(frame),
                         splits_hash=splits, labels_hash=labels)


def read_frame(data: DatasetHandle) -> pd.DataFrame:
    """The rows behind a dataset handle (labels, splits, texts)."""
    path = Path(data.path)
    if not path.exists():
        raise UpstreamMissing(f"dataset partition {data.key!r}: {path} is gone; re-materialize the 'dataset' asset")
    return pd.read_parquet(path)


@dataclass
class ModelExtraction:
    """What one model's pass did for a dataset partition."""

    model: str
    hit: bool
    stats: ExtractionStats | None
    layers_computed: list[int]


@dataclass
class HiddenResult:
    handle: HiddenHandle
    models: list[ModelExtraction]

    @property
    def hit(self) -> bool:
        return all(m.hit for m in self.models)

    @property
    def forward_calls(self) -> int:
        return sum(m.stats.forward_calls for m in self.models if m.stats)


def get_model(cfg: ExperimentConfig, model: str) -> LoadedModel:
    return load_model(cfg.model(model), models_dir())


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
        loaded = loader(mcfg.name) if loader else get_model(cfg, mcfg.name)
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
