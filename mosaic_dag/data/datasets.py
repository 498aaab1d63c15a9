"""Read a labelled text dataset from any supported source and normalise it.

Every dataset ends up as one parquet per (dataset, language) with the columns
``id, text, label, label_name, language, split`` and splits ``train``/``validation``/``test``.
When a source has no split (or lacks validation), a seeded stratified split is made here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from mosaic_dag.config import DatasetConfig, SplitConfig
from mosaic_dag.data.demo import LABEL_NAMES as DEMO_LABEL_NAMES
from mosaic_dag.data.demo import demo_dataset
from mosaic_dag.errors import DatasetError
from mosaic_dag.storage import stable_hash

log = logging.getLogger(__name__)

COLUMNS = ["id", "text", "label", "label_name", "language", "split"]
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
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


_INT_TEXT = re.compile(r"^\s*[-+]?\d+\s*$")


def _label_kind(v: object) -> str:
    """'int', 'fraction' (a number that is not a whole one) or 'text', judged from the value itself."""
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "int" if float(v).is_integer() else "fraction"
    if isinstance(v, str):
        return "int" if _INT_TEXT.match(v) else "text"
    return type(v).__name__


def _labels(raw: pd.Series, cfg: DatasetConfig, names: dict[int, str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids and names from label values; integers and class names are told apart by value, not dtype.

    A CSV column holding ``0``, ``1`` and ``pos`` is read by pandas as all strings; counted by dtype it
    would become three classes ``'0'``, ``'1'``, ``'pos'`` — so it is refused here instead.
    """
    field = cfg.label_field
    missing = raw.isna()
    if missing.any():
        first = int(np.flatnonzero(missing.to_numpy())[0])
        raise DatasetError(
            f"dataset {cfg.name!r}: label_field {field!r} is empty in {int(missing.sum())} rows (first: row {first}); "
            "drop or fill those rows"
        )
    values = raw.tolist()
    kinds = [_label_kind(v) for v in values]
    if "fraction" in kinds:
        row = kinds.index("fraction")
        raise DatasetError(
            f"dataset {cfg.name!r}: label_field {field!r} holds a number that is not a whole class id "
            f"({values[row]!r} in row {row}); use integer class ids or class names"
        )
    kind_set = set(kinds)
    if kind_set - {"int", "text"}:
        odd = sorted(kind_set - {"int", "text"})
        row = next(i for i, k in enumerate(kinds) if k in odd)
        raise DatasetError(
            f"dataset {cfg.name!r}: label_field {field!r} holds {odd[0]} values (first: row {row}); "
            "use integer class ids or class names"
        )
    if kind_set == {"int", "text"}:
        i_int, i_text = kinds.index("int"), kinds.index("text")
        raise DatasetError(
            f"dataset {cfg.name!r}: label_field {field!r} mixes integer and text labels ({values[i_int]!r} in row {i_int}, "
            f"{values[i_text]!r} in row {i_text}); use all integers or all strings"
        )
    if kind_set == {"int"}:
        ints = np.asarray([int(v) for v in values], dtype=np.int64)
        classes = sorted(set(ints.tolist()))
        label_of = {c: i for i, c in enumerate(classes)}
        label = np.asarray([label_of[v] for v in ints], dtype=np.int64)
        lookup = cfg.label_names or names or {}
        label_names = [str(lookup.get(c, c)) for c in classes]
    else:
        classes_s = sorted(set(values))
        label_of_s = {c: i for i, c in enumerate(classes_s)}
        label = np.asarray([label_of_s[v] for v in values], dtype=np.int64)
        label_names = list(classes_s)
    if len(label_names) < 2:
        raise DatasetError(
            f"dataset {cfg.name!r}: label_field {field!r} has a single class ({label_names[0]!r}); a probe needs at least 2"
        )
    return label, label_names


def _stratified(labels: np.ndarray, fraction: float, seed: int, what: str = "rows",
                split: str = "held-out") -> tuple[np.ndarray, np.ndarray]:
    if len(labels) < 2:
        raise DatasetError(
            f"{what}: only {len(labels)} row(s) left in train to carve the {split} split from; add rows "
            "(each class needs a few in train, validation and test) or give the source its own splits"
        )
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    n_take = max(1, int(round(len(labels) * fraction)))
    if strat is not None and n_take < len(np.unique(labels)):
        strat = None
    keep, take = train_test_split(idx, test_size=n_take, random_state=seed, stratify=strat)
    return np.sort(keep), np.sort(take)


def _cap_per_class(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` rows of each class — in each of the source's own splits when it has them — drawn
    with a seed, so a source dominated by one class can be balanced without touching its split."""
    rng = np.random.default_rng(seed)
    groups = ["label", "__split"] if "__split" in df.columns else ["label"]
    keep = [idx if len(idx) <= cap else rng.choice(idx, size=cap, replace=False)
            for _, idx in sorted(df.groupby(groups, sort=True).groups.items(), key=lambda kv: str(kv[0]))]
    return df.loc[np.sort(np.concatenate([np.asarray(k) for k in keep]))].reset_index(drop=True)


def _assign_splits(df: pd.DataFrame, split_cfg: SplitConfig, what: str = "dataset") -> pd.Series:
    """Use the source's split where it has one; carve what is missing, stratified and seeded."""
    split = pd.Series(["train"] * len(df), index=df.index, dtype=object)
    if "__split" in df.columns:
        src = df["__split"].astype(str).str.lower().map(_SPLIT_ALIASES)
        if src.isna().any():
            bad = sorted(set(df.loc[src.isna(), "__split"].astype(str)))[:5]
            raise DatasetError(f"{what}: split values {bad} are not train/validation/test (or val/dev); rename them")
        split[:] = src
    labels = df["label"].to_numpy()
    present = set(split)
    if "test" not in present:
        pool = np.flatnonzero((split == "train").to_numpy())
        _, take = _stratified(labels[pool], split_cfg.test, split_cfg.seed, what, "test")
        split.iloc[pool[take]] = "test"
    if "validation" not in present:
        pool = np.flatnonzero((split == "train").to_numpy())
        frac = split_cfg.validation / max(1e-9, 1 - (0 if "test" in present else split_cfg.test))
        _, take = _stratified(labels[pool], min(frac, 0.5), split_cfg.seed + 1, what, "validation")
        split.iloc[pool[take]] = "validation"
    return split


def normalise(raw: pd.DataFrame, cfg: DatasetConfig, language: str, split_cfg: SplitConfig) -> pd.DataFrame:
    """Rows of one language, checked, labelled and split; deterministic for a config."""
    for field, what in ((cfg.text_field, "text_field"), (cfg.label_field, "label_field")):
        if field not in raw.columns:
            cols = [c for c in raw.columns if not str(c).startswith("__")][:12]
            raise DatasetError(f"dataset {cfg.name!r}: {what} {field!r} is not a column; columns: {cols}")
    df = raw
    if cfg.language_field:
        if cfg.language_field not in df.columns:
            raise DatasetError(f"dataset {cfg.name!r}: language_field {cfg.language_field!r} is not a column")
        df = df[df[cfg.language_field].astype(str) == language]
        if df.empty:
            raise DatasetError(f"dataset {cfg.name!r}: no rows with {cfg.language_field}={language!r}; fix 'languages'")
    df = df.reset_index(drop=True)
    if df.empty:
        raise DatasetError(f"dataset {cfg.name!r}: the source has a header but no rows; add labelled rows")
    text = df[cfg.text_field]
    if text.isna().any() or not all(isinstance(t, str) for t in text):
        bad = int((text.isna() | ~text.map(lambda t: isinstance(t, str))).sum())
        raise DatasetError(f"dataset {cfg.name!r}: text_field {cfg.text_field!r} has {bad} missing or non-text values; drop them")
    empty = text.str.strip() == ""
    if empty.any():
        first = int(np.flatnonzero(empty.to_numpy())[0])
        raise DatasetError(
            f"dataset {cfg.name!r}: text_field {cfg.text_field!r} is empty or whitespace in {int(empty.sum())} rows "
            f"(first: row {first}); drop those rows"
        )
    label, label_names = _labels(df[cfg.label_field], cfg, raw.attrs.get("label_names"))
    out = pd.DataFrame({
        "text": text.astype(str).to_numpy(),
        "label": label,
        "label_name": [label_names[i] for i in label],
        "language": language,
    })
    if "__split" in df.columns:
        out["__split"] = df["__split"].to_numpy()
    else:
        # our own split: drop exact duplicate texts first so no text lands in two splits
        out = out.drop_duplicates("text", keep="first").reset_index(drop=True)
    if cfg.max_per_class is not None:
        out = _cap_per_class(out, cfg.max_per_class, split_cfg.seed + 11)
    if cfg.max_rows is not None and len(out) > cfg.max_rows:
        _, take = _stratified(out["label"].to_numpy(), cfg.max_rows / len(out), split_cfg.seed + 7)
        out = out.iloc[take].reset_index(drop=True)
    out["id"] = [f"{cfg.name}.{language}.{i:07d}" for i in range(len(out))]
    out["split"] = _assign_splits(out, split_cfg, f"dataset {cfg.name!r}.{language}").to_numpy()
    out = out.drop(columns=[c for c in out.columns if c.startswith("__")])
    if cfg.drop_shared_texts:
        out = drop_shared_texts(out, f"dataset {cfg.name!r}.{language}")
    for split in ("train", "test"):
        if not (out["split"] == split).any():
            raise DatasetError(f"dataset {cfg.name!r}.{language}: no {split} rows after splitting; add more rows")
    train_classes = sorted(set(out.loc[out["split"] == "train", "label_name"]))
    if len(train_classes) < 2:
        raise DatasetError(
            f"dataset {cfg.name!r}.{language}: the train split has a single class ({train_classes[0]!r}); "
            "a probe needs at least 2 — fix the split column, or drop it so mosaic makes a stratified split"
        )
    check_no_leakage(out, cfg, language)
    return out[COLUMNS]


def drop_shared_texts(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """A source's own splits that share texts: keep each text in one split only — test first, then
    validation — so test rows stay the source's and no probe trains or selects on a test text."""
    keep = np.ones(len(df), dtype=bool)
    seen: set[str] = set()
    for split in ("test", "validation", "train"):
        rows = (df["split"] == split).to_numpy()
        texts = df["text"].to_numpy()
        clash = rows & np.isin(texts, list(seen))
        keep &= ~clash
        seen |= set(texts[rows])
    if not keep.all():
        log.warning("%s: dropped %d train/validation copies of texts that are also in test (or, for train, validation) "
                       "(drop_shared_texts)", what, int((~keep).sum()))
    return df[keep].reset_index(drop=True)


def check_no_leakage(df: pd.DataFrame, cfg: DatasetConfig, language: str) -> None:
    """A text in two splits lets a probe score on what it trained on: refused unless the config allows it."""
    if cfg.allow_shared_texts:
        return
    per_text = df.groupby("text", sort=False)["split"].agg(lambda s: sorted(set(s)))
    shared = per_text[per_text.map(len) > 1]
    if len(shared):
        text, splits = shared.index[0], shared.iloc[0]
        raise DatasetError(
            f"dataset {cfg.name!r}.{language}: {len(shared)} texts are in more than one split (first: {text[:60]!r} in "
            f"{' and '.join(splits)}), so test scores would be inflated; remove the duplicates from the source, "
            "set drop_shared_texts: true to keep only their test (else validation) copy, or allow_shared_texts: true "
            "to keep them all"
        )


def load_dataset(cfg: DatasetConfig, language: str, split_cfg: SplitConfig, base: Path | None = None) -> pd.DataFrame:
    """Read + normalise one (dataset, language) partition."""
    if cfg.modality == "image":
        from mosaic_dag.data.images import load_image_dataset

        return load_image_dataset(cfg, language, split_cfg, base)
    return normalise(read_source(cfg, base, language), cfg, language, split_cfg)


def content_hash(df: pd.DataFrame) -> str:
    """Hash of the rows that matter for caching (ids, texts, order)."""
    h = pd.util.hash_pandas_object(df[["id", "text"]], index=False).to_numpy()
    return stable_hash([len(df), h.tobytes().hex()], length=20)


def class_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {label_name: count}} for metadata and checks."""
    table = df.groupby(["split", "label_name"]).size()
    return {s: {str(k): int(v) for k, v in table[s].items()} for s in table.index.get_level_values(0).unique()}


def shared_texts(df: pd.DataFrame) -> int:
    """How many distinct texts appear in more than one split (leakage)."""
    per_text = df.groupby("text")["split"].nunique()
    return int((per_text > 1).sum())
