"""Which rows a report figure or table shows: usable rows, in-language rows, and the validation-selected
configuration of each group (test-best only when a table has no validation score)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["NoData", "best", "by_validation", "ci_columns", "in_language", "rule", "tasks_of", "usable", "yerr"]


class NoData(ValueError):
    """A figure or table has nothing to show; the message says why (one line)."""


def ci_columns(df: pd.DataFrame) -> tuple[str | None, str | None]:
    for lo, hi in (("macro_f1_ci_low", "macro_f1_ci_high"), ("ci_low", "ci_high")):
        if lo in df.columns and hi in df.columns:
            return lo, hi
    return None, None


def usable(df: pd.DataFrame | None, need: Sequence[str], what: str) -> pd.DataFrame:
    """Rows with a macro-F1 and every needed column present; ``NoData`` says why there are none."""
    if df is None or len(df) == 0:
        raise NoData(f"{what}: no rows")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise NoData(f"{what}: missing column(s) {', '.join(missing)}")
    out = df[df["macro_f1"].notna()] if "macro_f1" in df.columns else df
    for c in need:
        if c not in ("threshold",):  # a missing threshold means "not binarised", a real value
            out = out[out[c].notna()]
    if len(out) == 0:
        raise NoData(f"{what}: no rows with a macro-F1 and {', '.join(need)}")
    return out


def join_columns(df: pd.DataFrame, cols: Sequence[str], sep: str) -> pd.Series:
    """Row labels from several columns; missing values become "n/a" (pandas 3 keeps NaN in astype(str))."""
    parts = [df[c].map(lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
             for c in cols]
    out = parts[0]
    for p in parts[1:]:
        out = out + sep + p
    return out


def in_language(rows: pd.DataFrame) -> pd.DataFrame:
    """In-language rows only; transfer rows have their own heatmaps."""
    if "train_language" in rows.columns and "test_language" in rows.columns:
        return rows[rows["train_language"].isna() | (rows["train_language"] == rows["test_language"])]
    return rows


def by_validation(df: pd.DataFrame) -> bool:
    return "validation_macro_f1" in df.columns and bool(df["validation_macro_f1"].notna().any())


def rule(df: pd.DataFrame) -> str:
    return "selected on validation" if by_validation(df) else "test-best (oracle): no validation score"


def best(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The validation-best row of each group (ties: the partition's own pick, then the first row);
    test-best only without a validation score."""
    col = "validation_macro_f1" if by_validation(df) else "macro_f1"
    sel = df["selected"].fillna(False).astype(bool) if "selected" in df.columns else pd.Series(False, index=df.index)
    order = df.assign(_score=df[col].astype(float).fillna(-np.inf), _sel=sel)
    order = order.sort_values(["_score", "_sel"], ascending=False, kind="stable")
    return order.drop_duplicates(subset=list(keys), keep="first").drop(columns=["_score", "_sel"])


def yerr(rows: pd.DataFrame) -> np.ndarray | None:
    lo, hi = ci_columns(rows)
    if lo is None or hi is None:
        return None
    f1 = rows["macro_f1"].to_numpy(float)
    low = np.nan_to_num(f1 - rows[lo].to_numpy(float), nan=0.0).clip(min=0)
    high = np.nan_to_num(rows[hi].to_numpy(float) - f1, nan=0.0).clip(min=0)
    if not (low.any() or high.any()):
        return None
    return np.vstack([low, high])


def tasks_of(rows: pd.DataFrame) -> pd.Series:
    cols = [c for c in ("dataset", "language") if c in rows.columns]
    return join_columns(rows, cols, ".") if cols else pd.Series("all", index=rows.index)
