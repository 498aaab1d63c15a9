"""Read a dataset's raw rows from where the config says they are: a local file or folder, the hub, bundled."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mosaic_dag.config import DatasetConfig
from mosaic_dag.data.demo import LABEL_NAMES as DEMO_LABEL_NAMES
from mosaic_dag.data.demo import demo_dataset
from mosaic_dag.data.splits import _SPLIT_ALIASES
from mosaic_dag.errors import DatasetError

log = logging.getLogger(__name__)

_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def _read_file(path: Path, name: str) -> pd.DataFrame:
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"dataset {name!r}: path {str(path)!r} has an unsupported file type; use .csv, .tsv, .jsonl, .json or .parquet"
        )
    try:
        if kind == "csv":
            return _read_csv(path, name)
        if kind == "tsv":
            return pd.read_csv(path, sep="\t", encoding="utf-8-sig")
        if kind == "jsonl":
            return pd.read_json(path, lines=True)
        if kind == "json":
            return pd.read_json(path)
        return pd.read_parquet(path)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas/pyarrow raise many types; the user needs one line
        if kind == "jsonl":
            _raise_bad_jsonl_line(path, name)
        text = str(err).strip()
        reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise DatasetError(
            f"dataset {name!r}: path {str(path)!r} is not readable {kind} ({reason}); fix or re-export the file"
        ) from None


_OTHER_DELIMITERS = (";", "\t", "|")


def _read_csv(path: Path, name: str) -> pd.DataFrame:
    """Comma-separated by default; a file whose header only splits on ';', tab or '|' is read with that.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped from the first column name.
    """
    df = pd.read_csv(path, encoding="utf-8-sig")
    if len(df.columns) == 1:
        header = str(df.columns[0])
        for sep in _OTHER_DELIMITERS:
            if sep in header:
                log.info("dataset %r: %s has a %r-delimited header; reading it with that delimiter", name, path, sep)
                return pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    return df


def _raise_bad_jsonl_line(path: Path, name: str) -> None:
    """Name the first line of a .jsonl file that is not one JSON object (pandas reports a byte offset)."""
    import json

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"dataset {name!r}: path {str(path)!r} is not readable jsonl ({err}); fix or re-export the file") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"dataset {name!r}: path {str(path)!r} line {i} is not valid JSON ({err.msg}, column {err.colno}); "
                "fix that line (one JSON object per line)"
            ) from None
        if not isinstance(value, dict):
            raise DatasetError(
                f"dataset {name!r}: path {str(path)!r} line {i} is a JSON {type(value).__name__}, not an object; "
                "write one {\"text\": ..., \"label\": ...} object per line"
            )


def _read_text_lines(folder: Path, cfg: DatasetConfig) -> pd.DataFrame | None:
    """``{split}_text.txt`` + ``{split}_labels.txt`` pairs (the XLM-T / tweet_eval layout)."""
    frames = []
    for f in sorted(folder.glob("*_text.txt")):
        split = f.name.removesuffix("_text.txt")
        labels = folder / f"{split}_labels.txt"
        if not labels.exists():
            raise DatasetError(f"path {str(f)!r} has no matching {labels.name}; add it or remove the text file")
        texts = f.read_text(encoding="utf-8").splitlines()
        labs = labels.read_text(encoding="utf-8").splitlines()
        if len(texts) != len(labs):
            raise DatasetError(f"path {str(folder)!r}: {f.name} has {len(texts)} lines but {labels.name} has {len(labs)}")
        bad = next((i for i, x in enumerate(labs) if not x.strip().lstrip("-").isdigit()), None)
        if bad is not None:
            raise DatasetError(
                f"dataset {cfg.name!r}: {labels.name} line {bad + 1} is {labs[bad]!r}, not an integer label; fix that line"
            )
        frames.append(pd.DataFrame({cfg.text_field: texts, cfg.label_field: [int(x) for x in labs], "__split": split}))
    return pd.concat(frames, ignore_index=True) if frames else None


def _read_local(cfg: DatasetConfig, base: Path, language: str | None = None) -> pd.DataFrame:
    if cfg.paths:
        if language not in cfg.paths:
            raise DatasetError(f"dataset {cfg.name!r}: paths has no entry for language {language!r}; add it")
        cfg = cfg.model_copy(update={"path": cfg.paths[language], "paths": None})
    path = Path(str(cfg.path)).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise DatasetError(f"dataset {cfg.name!r}: path {str(path)!r} does not exist; fix 'path' in the config")
    if path.is_file() and cfg.label_from == "file":
        raise DatasetError(f"dataset {cfg.name!r}: label_from 'file' needs a folder of per-class split files "
                           f"(harmful_train.json, harmless_train.json, …), but {str(path)!r} is one file; "
                           "point path at the folder or use label_field")
    if path.is_file():
        df = _read_file(path, cfg.name)
        if cfg.split_field:
            if cfg.split_field not in df.columns:
                raise DatasetError(
                    f"dataset {cfg.name!r}: split_field {cfg.split_field!r} is not a column; columns: {list(df.columns)[:12]}"
                )
            df["__split"] = df[cfg.split_field]
        elif "split" in df.columns:
            df["__split"] = df["split"]
        return df
    lines = None if cfg.label_from == "file" else _read_text_lines(path, cfg)
    if lines is not None:
        return lines
    frames = []
    for f in sorted(path.iterdir()):
        if f.suffix.lower() not in _READERS:
            continue
        stem = f.stem.lower()
        split = next((alias for alias in _SPLIT_ALIASES if stem == alias or stem.endswith(f"_{alias}")
                      or f"_{alias}_" in stem or stem.startswith(f"{alias}_")), None)
        if split is None:
            continue
        part = _read_file(f, cfg.name)
        part["__split"] = split
        if cfg.label_from == "file":
            part[cfg.label_field] = _class_from_file(stem, split)
        frames.append(part)
    if not frames:
        raise DatasetError(
            f"dataset {cfg.name!r}: folder {str(path)!r} has no train/validation/test files; name them e.g. train.csv, test.csv"
        )
    return pd.concat(frames, ignore_index=True)


def _class_from_file(stem: str, split: str) -> str:
    """``harmful_train`` → ``harmful``: the file name without its split word and separators."""
    words = [w for w in stem.replace("-", "_").split("_") if w and w not in _SPLIT_ALIASES and w != split]
    return "_".join(words)


def _read_hub(cfg: DatasetConfig) -> pd.DataFrame:
    import datasets as hf_datasets

    try:
        loaded = hf_datasets.load_dataset(str(cfg.hf_name), cfg.config_name, split=cfg.split)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs one line
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DatasetError(
            f"dataset {cfg.name!r}: hf_name {cfg.hf_name!r} could not be loaded ({reason}); "
            "check the name, or pre-fill the Hugging Face cache and set HF_HUB_OFFLINE=1, or use a local 'path'"
        ) from None
    parts = loaded.items() if isinstance(loaded, dict) else [(cfg.split or "train", loaded)]
    frames = []
    names: dict[int, str] | None = None
    for split, ds in parts:
        feat = ds.features.get(cfg.label_field) if hasattr(ds, "features") else None
        if feat is not None and hasattr(feat, "names"):
            names = dict(enumerate(feat.names))
        frame = ds.to_pandas()
        frame["__split"] = split
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    if names:
        df.attrs["label_names"] = names
    return df


def read_source(cfg: DatasetConfig, base: Path | None = None, language: str | None = None) -> pd.DataFrame:
    """Raw rows with the configured text/label (and optional language/split) columns."""
    base = base or Path.cwd()
    if cfg.path == "bundled:demo":
        df = demo_dataset()
        df.attrs["label_names"] = dict(DEMO_LABEL_NAMES)
        return df
    if cfg.path or cfg.paths:
        return _read_local(cfg, base, language)
    return _read_hub(cfg)
