"""Normalise a labelled dataset's raw rows (see mosaic_dag.data.sources): labels, splits, leakage checked.

Every dataset ends up as one parquet per (dataset, language) with the columns
``id, text, label, label_name, language, split`` and splits ``train``/``validation``/``test``.
When a source has no split (or lacks validation), a seeded stratified split is made here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from mosaic_dag.config import DatasetConfig, SplitConfig
from mosaic_dag.data.leakage import check_no_leakage, drop_shared_texts
from mosaic_dag.data.sources import read_source
from mosaic_dag.data.splits import _cap_per_class, _stratified, assign_splits
from mosaic_dag.errors import DatasetError
from mosaic_dag.storage import stable_hash

COLUMNS = ["id", "text", "label", "label_name", "language", "split"]


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
    out["split"] = assign_splits(out, split_cfg, f"dataset {cfg.name!r}.{language}").to_numpy()
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
