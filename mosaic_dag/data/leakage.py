"""Texts in two splits: dropped from all but one split on request, else refused, and counted for metadata."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from mosaic_dag.config import DatasetConfig
from mosaic_dag.errors import DatasetError

log = logging.getLogger(__name__)


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


def shared_texts(df: pd.DataFrame) -> int:
    """How many distinct texts appear in more than one split (leakage)."""
    per_text = df.groupby("text")["split"].nunique()
    return int((per_text > 1).sum())
