"""Read a labelled image dataset and normalise it like a text one, images stored as PNG bytes.

An image partition (``<dataset>.image``) is one parquet with the text columns ``id, text, label,
label_name, language, split`` plus ``image`` (PNG bytes, RGB). ``text`` holds ``image:<sha256>`` of
the PNG, so the text checks keep their meaning: no empty rows, no image in two splits, and the content
hash (the cache key) changes with every pixel. Every image is decoded and checked before anything is
written: unreadable, zero-size or unsupported-mode images fail with one line naming the row.

Sources: ``bundled:digits`` (scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits, offline),
a folder with one sub-folder per class (optionally inside train/validation/test folders), a
CSV/JSONL/Parquet whose ``image_field`` holds a path (relative to the file) or the image bytes, and
Hugging Face datasets with an ``Image`` feature. ``descriptions`` adds a text partition written from
templates, one row per (template, class), with the same label ids: the text side of text -> image transfer.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.config import IMAGE_LANGUAGE, DatasetConfig, SplitConfig
from mosaic_dag.errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"}  # what converts to RGB without guessing colours
MAX_PIXELS = 64_000_000
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_IMAGE_TEXT = "__image_text"


def to_png(value: Any, where: str, base: Path | None = None) -> bytes:
    """Decode one image (bytes, a path, an HF ``{"bytes", "path"}`` dict, PIL image or array) to RGB PNG."""
    from PIL import Image

    source = value
    if isinstance(value, dict):  # the Hugging Face Image feature as pandas sees it
        source = value.get("bytes") or value.get("path")
    try:
        if isinstance(source, np.ndarray):
            arr = source
            if arr.dtype != np.uint8:
                top = float(arr.max(initial=0.0))
                arr = np.clip(arr * (255.0 / top if top > 0 else 1.0), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
        elif isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray, memoryview)) and len(source):
            img = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, str) and source.strip():
            path = Path(source).expanduser()
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                raise DatasetError(f"{where}: image file {str(path)!r} does not exist; fix the path")
            img = Image.open(path)
        else:
            raise DatasetError(f"{where}: has no image (got {type(source).__name__}); give a path or the image bytes")
        if img.width * img.height > MAX_PIXELS:
            raise DatasetError(f"{where}: image is {img.width}x{img.height}, over {MAX_PIXELS} pixels; resize it")
        img.load()
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types; the user needs one line
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)
        raise DatasetError(f"{where}: image is unreadable ({reason}); fix or remove it") from None
    if img.width == 0 or img.height == 0:
        raise DatasetError(f"{where}: image has zero size ({img.width}x{img.height}); remove it")
    if img.mode not in MODES:
        raise DatasetError(f"{where}: image mode {img.mode!r} is not supported; convert it to RGB or L")
    if img.mode in ("I;16", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0.0)
        img = Image.fromarray((arr * (255.0 / top if top > 0 else 1.0)).astype(np.uint8))
    out = io.BytesIO()
    img.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def decode_png(data: bytes) -> Any:
    """PNG bytes from a normalised partition back to a PIL RGB image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _digits() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.round(im * (255.0 / 16.0)).astype(np.uint8) for im in d.images]
    df = pd.DataFrame({"image": images, "label": d.target.astype(np.int64)})
    df.attrs["label_names"] = dict(enumerate(DIGIT_NAMES))
    return df


def _class_folders(folder: Path) -> pd.DataFrame | None:
    """``<class>/<image>`` or ``<split>/<class>/<image>``; None when the folder is not laid out so."""
    from mosaic_dag.data.splits import _SPLIT_ALIASES

    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subs:
        return None
    rows: list[dict[str, Any]] = []
    split_dirs = [p for p in subs if p.name.lower() in _SPLIT_ALIASES]
    layout = [(p, p.name) for p in split_dirs] if split_dirs and len(split_dirs) == len(subs) else [(folder, None)]
    for root, split in layout:
        for cls in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append({"image": str(f), "label": cls.name, **({"__split": split} if split else {})})
    return pd.DataFrame(rows) if rows else None


def read_images(cfg: DatasetConfig, base: Path | None = None) -> tuple[pd.DataFrame, str, Path | None]:
    """Raw rows (undecoded image values + raw labels), the image column, and the folder paths resolve against."""
    from mosaic_dag.data import sources
    base = base or Path.cwd()
    if cfg.path == "bundled:digits":
        df = _digits()
        df = df.rename(columns={"label": cfg.label_field}) if cfg.label_field != "label" else df
        return df, "image", None
    if cfg.hf_name:
        return sources._read_hub(cfg), cfg.image_field, None
    path = Path(str(cfg.path)).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise DatasetError(f"dataset {cfg.name!r}: path {str(path)!r} does not exist; fix 'path' in the config")
    if path.is_dir():
        df = _class_folders(path)
        if df is not None:
            return df.rename(columns={"label": cfg.label_field}), "image", None
    df = sources._read_local(cfg.model_copy(update={"modality": "text"}), base)
    return df, cfg.image_field, (path if path.is_dir() else path.parent)


def _image_text(png: bytes) -> str:
    return "image:" + hashlib.sha256(png).hexdigest()


def load_image_dataset(cfg: DatasetConfig, language: str, split_cfg: SplitConfig, base: Path | None = None) -> pd.DataFrame:
    """One partition of an image dataset: ``image`` (the images) or the descriptions' language (texts)."""
    from mosaic_dag.data import datasets as ds
    raw, column, root = read_images(cfg, base)
    if cfg.label_field not in raw.columns:
        cols = [c for c in raw.columns if not str(c).startswith("__")][:12]
        raise DatasetError(f"dataset {cfg.name!r}: label_field {cfg.label_field!r} is not a column; columns: {cols}")
    if language != IMAGE_LANGUAGE:
        if cfg.description(language) is None:
            raise DatasetError(f"dataset {cfg.name!r} has no partition {language!r}; it has "
                               f"{[IMAGE_LANGUAGE] + cfg.description_languages}")
        return describe(raw, cfg, language, split_cfg)
    if column not in raw.columns:
        cols = [c for c in raw.columns if not str(c).startswith("__")][:12]
        raise DatasetError(f"dataset {cfg.name!r}: image_field {column!r} is not a column; columns: {cols}")
    pngs: dict[str, bytes] = {}
    texts = []
    for i, value in enumerate(raw[column].tolist()):
        png = to_png(value, f"dataset {cfg.name!r}: row {i} ({column})", root)
        text = _image_text(png)
        pngs[text] = png
        texts.append(text)
    frame = raw.drop(columns=[column]).assign(**{_IMAGE_TEXT: texts})
    frame.attrs = dict(raw.attrs)
    out = ds.normalise(frame, cfg.model_copy(update={"text_field": _IMAGE_TEXT, "modality": "text", "tokens": None,
                                                     "descriptions": None}), IMAGE_LANGUAGE, split_cfg)
    out["image"] = out["text"].map(pngs)
    return out[ds.COLUMNS + ["image"]]


def describe(raw: pd.DataFrame, cfg: DatasetConfig, language: str, split_cfg: SplitConfig) -> pd.DataFrame:
    """Text rows ``template.format(label_name=...)`` for every class of the image source, same label ids.

    ``label_name`` is the class as ``names`` writes it in that language (default: the class name itself);
    the rows keep the image partition's ``label_name`` so both partitions share one label space.
    """
    from mosaic_dag.data import datasets as ds
    desc = cfg.description(language)
    assert desc is not None
    values = raw[cfg.label_field]
    _, names = ds._labels(values, cfg, raw.attrs.get("label_names"))
    unknown = sorted(set(desc.names or {}) - set(names))
    if unknown:
        raise DatasetError(f"dataset {cfg.name!r}.{language}: descriptions.names has {unknown[:5]}, which are not "
                           f"classes; the classes are {names[:12]}")
    classes = sorted(set(values.tolist()))
    written = desc.names or {}
    rows = [{"text": t.format(label_name=written.get(name, name)), "label": c}
            for t in desc.templates for c, name in zip(classes, names)]
    frame = pd.DataFrame(rows)
    frame.attrs = dict(raw.attrs)
    lang = language
    dcfg = cfg.model_copy(update={"text_field": "text", "label_field": "label", "modality": "text", "tokens": None,
                                  "descriptions": None, "max_rows": None, "language": lang})
    out = ds.normalise(frame, dcfg, lang, split_cfg)
    missing = set(range(len(names))) - set(out.loc[out["split"] == "test", "label"])
    if missing:
        raise DatasetError(f"dataset {cfg.name!r}.{lang}: {len(missing)} classes have no description in test; "
                           "add templates to 'descriptions.templates'")
    return out


def is_image_frame(frame: pd.DataFrame) -> bool:
    """True for a normalised image partition (feature sources that read words, like TF-IDF, skip it)."""
    return "image" in frame.columns
