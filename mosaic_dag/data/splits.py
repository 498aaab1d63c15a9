"""The one split implementation: a source's own splits kept, what is missing carved stratified and seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from mosaic_dag.config import SplitConfig
from mosaic_dag.errors import DatasetError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


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


def assign_splits(df: pd.DataFrame, split_cfg: SplitConfig, what: str = "dataset") -> pd.Series:
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
