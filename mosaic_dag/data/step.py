"""The dataset step: one (dataset, language) partition read, labelled, normalised and written.

    <data_dir>/datasets/<dataset>/<language>.parquet   (see mosaic_dag.paths)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mosaic_dag.config import ExperimentConfig, ModelConfig
from mosaic_dag.data import datasets as ds
from mosaic_dag.errors import DatasetError
from mosaic_dag.handles import DatasetHandle, UpstreamMissing
from mosaic_dag.lm.models import LoadedModel, ModelCache, load_held
from mosaic_dag.paths import dataset_file
from mosaic_dag.storage import stable_hash, write_parquet


@dataclass
class DatasetResult:
    path: Path
    frame: pd.DataFrame
    content_hash: str


def load_behaviour_model(cfg: ExperimentConfig, name: str, models: ModelCache | None = None) -> LoadedModel:
    """The behaviour model: a configured model by name, else any id/folder/bundled model (held in ``models``)."""
    known = {m.name: m for m in cfg.models}
    mcfg = known.get(name) or ModelConfig(name="behaviour-target", id=name, layers=[0])
    return load_held(mcfg, models)


def with_behaviour_labels(cfg: ExperimentConfig, dataset: str, language: str, raw: pd.DataFrame,
                          models: ModelCache | None = None) -> pd.DataFrame:
    """Add a ``__behaviour`` column: what the behaviour model did on each text (see mosaic_dag.data.behaviour)."""
    from mosaic_dag.data.behaviour import KeywordJudge, ModelJudge, behaviour_labels

    dcfg = cfg.dataset(dataset)
    b = dcfg.behaviour
    assert b is not None
    if dcfg.language_field:
        raw = raw[raw[dcfg.language_field].astype(str) == language].reset_index(drop=True)
    if dcfg.text_field not in raw.columns:
        raise DatasetError(f"dataset {dataset!r}: text_field {dcfg.text_field!r} is not a column")
    behaviour_model = load_behaviour_model(cfg, b.model, models)
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
        judge_model = load_behaviour_model(cfg, str(b.judge_model), models)
        judge = ModelJudge(judge_model.model, judge_model.tokenizer)
    else:
        judge = KeywordJudge(b.refusal_patterns) if b.refusal_patterns else KeywordJudge()
    labels = behaviour_labels(
        behaviour_model.model, behaviour_model.tokenizer, texts, task=b.task, prompt_template=b.prompt_template,
        judge=judge, options=options, answers=answers, chat=b.chat, max_new_tokens=b.max_new_tokens,
        batch_size=b.batch_size,
    )
    out = raw.copy()
    out["__behaviour"] = labels["label_name"].to_numpy()
    out.attrs = dict(raw.attrs)
    return out


def build_dataset(cfg: ExperimentConfig, dataset: str, language: str, models: ModelCache | None = None) -> DatasetResult:
    """Read, normalise and write one (dataset, language) parquet atomically (``models``: where behaviour
    labels' models are held)."""
    dcfg = cfg.dataset(dataset)
    if language not in cfg.dataset_languages(dataset):
        raise DatasetError(f"dataset {dataset!r} has no language {language!r} in the config; add it to 'languages'")
    if dcfg.behaviour is not None:
        raw = with_behaviour_labels(cfg, dataset, language, ds.read_source(dcfg, cfg.base_dir, language), models)
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
