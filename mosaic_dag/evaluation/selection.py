"""Which configuration is "best": the one with the highest validation score, never the test score.

Selection rule: the configuration reported as "best" for a feature source — within a partition and
across layers, SAEs, poolings, thresholds, top-n, classifiers and k — is the one with the highest
``validation_macro_f1`` (cross-validated on train+validation; ties: the first in the config's order). Its
TEST macro-F1 is what gets printed, plotted, shown and logged; the test-best is never a selection.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from mosaic_dag.evaluation.schema import SELECTION_KEYS


if TYPE_CHECKING:
    from mosaic_dag.evaluation.sweeps import ProbeRun

__all__ = ["best_rows", "best_run", "mark_selected", "oracle_rows", "validation_key"]


def validation_key(v: float) -> float:
    """Sort key of a validation score: a missing or non-finite one ranks last."""
    return float(v) if v is not None and math.isfinite(float(v)) else -math.inf


def mark_selected(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """``selected`` = True on the validation-best row of each group (in-language rows only; ties: table order)."""
    out = table.copy()
    out["selected"] = False
    if not out.empty:
        out.loc[_best_index(out, keys), "selected"] = True
    return out


def _best_index(table: pd.DataFrame, keys: list[str] | None) -> pd.Index:
    keys = list(keys or SELECTION_KEYS)
    rows = table[table["train_language"] == table["test_language"]] if "train_language" in table.columns else table
    score = rows["validation_macro_f1"].map(validation_key) if "validation_macro_f1" in rows.columns else pd.Series(-math.inf, index=rows.index)
    # ties: a row its partition selected (config order) first, then table order; never the test score
    sel = rows["selected"].astype(bool) if "selected" in rows.columns else pd.Series(False, index=rows.index)
    order = rows.assign(_validation=score, _sel=sel).sort_values(["_validation", "_sel"], ascending=False, kind="stable")
    return order.groupby(keys, sort=False).head(1).index


def best_rows(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """The selected configuration per feature source and task: highest ``validation_macro_f1``.

    ``keys`` default: across layers and SAEs (``SELECTION_KEYS``); pass partition columns to select
    within a layer. Only in-language rows are candidates. Ties keep the first row; test scores
    never take part.
    """
    if table.empty:
        return table
    return table.loc[_best_index(table, keys)].sort_values(list(keys or SELECTION_KEYS), kind="stable").reset_index(drop=True)


def oracle_rows(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """The TEST-best row per group: an oracle for reference only, never a selection."""
    if table.empty:
        return table
    keys = list(keys or SELECTION_KEYS)
    order = table.sort_values("macro_f1", ascending=False, kind="stable")
    return order.groupby(keys, sort=False).head(1).sort_values(keys, kind="stable").reset_index(drop=True)


def best_run(runs: "list[ProbeRun]", features: str) -> "ProbeRun | None":
    """The validation-selected probe of one feature source (ties: the first)."""
    cands = [r for r in runs if r.spec.features == features]
    return max(cands, key=lambda r: validation_key(r.result.validation_macro_f1), default=None)
