"""Figures and a markdown report from tidy results tables.

Every plot function takes a tidy DataFrame and returns a ``Plot``: either the PNG it wrote
or the reason it wrote nothing (missing columns, no rows with a score). A figure is never
written without data. Figures use matplotlib's object API on the Agg canvas (no pyplot and
no global backend switch, so this is safe inside Dagster workers), and every file is
written atomically (temp file in the same folder, then ``os.replace``); ``index.md`` is
written last so a reader never sees a link to a missing PNG.

Where a table has several rows for one plotted point (e.g. several classifiers for one
layer x pooling), the point is the row with the best VALIDATION score (``val_macro_f1``) and
its own test macro-F1 and CI. A table without ``val_macro_f1`` falls back to the test-best,
and the figure's title then says "test-best (oracle)".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mosaic_dag.storage import atomic_path
from mosaic_dag.tables import markdown_table
from mosaic_dag.transfer import heatmap_png

__all__ = [
    "Plot",
    "Report",
    "plot_binarization",
    "plot_conditions",
    "plot_layer_pooling",
    "plot_sources",
    "plot_transfer",
    "write_report",
]

# columns that, when they vary, split a figure into separate series
_SERIES_COLUMNS: tuple[str, ...] = ("model", "sae", "dataset", "language")
_TABLE_COLUMNS: tuple[str, ...] = (
    "model", "layer", "sae", "dataset", "language", "features", "pooling", "threshold", "top_n",
    "classifier", "k", "train_language", "test_language", "val_macro_f1", "selected", "macro_f1",
    "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "auroc", "n_train", "n_test", "vs_hidden", "vs_tfidf",
    "vs_judge", "cost",
)


@dataclass(frozen=True)
class Plot:
    """Outcome of one plot call: ``path`` when written, else ``skipped`` says why."""

    name: str
    path: Path | None
    skipped: str | None = None
    n_points: int = 0

    @property
    def written(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Report:
    """What ``write_report`` produced: the index, the PNGs it links, and the skipped plots."""

    index: Path
    pngs: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _ci_columns(df: pd.DataFrame) -> tuple[str | None, str | None]:
    for lo, hi in (("macro_f1_ci_low", "macro_f1_ci_high"), ("ci_low", "ci_high")):
        if lo in df.columns and hi in df.columns:
            return lo, hi
    return None, None


def _usable(df: pd.DataFrame | None, need: Sequence[str], what: str) -> tuple[pd.DataFrame | None, str | None]:
    """Rows with a macro-F1 and every needed column present, or the reason there are none."""
    if df is None or len(df) == 0:
        return None, f"{what}: no rows"
    missing = [c for c in need if c not in df.columns]
    if missing:
        return None, f"{what}: missing column(s) {', '.join(missing)}"
    out = df[df["macro_f1"].notna()] if "macro_f1" in df.columns else df
    for c in need:
        if c not in ("threshold",):  # a missing threshold means "not binarised", a real value
            out = out[out[c].notna()]
    if len(out) == 0:
        return None, f"{what}: no rows with a macro-F1 and {', '.join(need)}"
    return out, None


def _join(df: pd.DataFrame, cols: Sequence[str], sep: str) -> pd.Series:
    """Row labels from several columns; missing values become "n/a" (pandas 3 keeps NaN in astype(str))."""
    parts = [df[c].map(lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
             for c in cols]
    out = parts[0]
    for p in parts[1:]:
        out = out + sep + p
    return out


def _series_key(df: pd.DataFrame, first: Sequence[str]) -> pd.Series:
    """Label per row from ``first`` columns plus any context column that varies."""
    cols = list(first) + [c for c in _SERIES_COLUMNS if c in df.columns and c not in first
                          and df[c].nunique(dropna=True) > 1]
    if not cols:
        return pd.Series("all", index=df.index)
    return _join(df, cols, " / ")


def _in_language(rows: pd.DataFrame) -> pd.DataFrame:
    """In-language rows only; transfer rows have their own heatmaps."""
    if "train_language" in rows.columns and "test_language" in rows.columns:
        return rows[rows["train_language"].isna() | (rows["train_language"] == rows["test_language"])]
    return rows


def _by_validation(df: pd.DataFrame) -> bool:
    return "val_macro_f1" in df.columns and bool(df["val_macro_f1"].notna().any())


def _rule(df: pd.DataFrame) -> str:
    return "selected on validation" if _by_validation(df) else "test-best (oracle): no validation score"


def _best(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The validation-best row of each group (ties: the first row); test-best only without a validation score."""
    col = "val_macro_f1" if _by_validation(df) else "macro_f1"
    sel = df["selected"].fillna(False).astype(bool) if "selected" in df.columns else pd.Series(False, index=df.index)
    order = df.assign(_score=df[col].astype(float).fillna(-np.inf), _sel=sel)
    order = order.sort_values(["_score", "_sel"], ascending=False, kind="stable")  # ties: the partition's own pick
    return order.drop_duplicates(subset=list(keys), keep="first").drop(columns=["_score", "_sel"])


def _yerr(rows: pd.DataFrame) -> np.ndarray | None:
    lo, hi = _ci_columns(rows)
    if lo is None or hi is None:
        return None
    f1 = rows["macro_f1"].to_numpy(float)
    low = np.nan_to_num(f1 - rows[lo].to_numpy(float), nan=0.0).clip(min=0)
    high = np.nan_to_num(rows[hi].to_numpy(float) - f1, nan=0.0).clip(min=0)
    if not (low.any() or high.any()):
        return None
    return np.vstack([low, high])


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


def _grid(fig: Figure, n: int, max_cols: int = 3) -> list[Axes]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _f1_axis(ax: Axes) -> None:
    ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------- plots


def plot_layer_pooling(df: pd.DataFrame | None, path: str | Path, *, features: str | None = None) -> Plot:
    """Macro-F1 by layer, one line per pooling (best setting per point), one panel per model."""
    name = Path(path).stem
    rows, why = _usable(df, ("layer", "pooling", "macro_f1"), "layer x pooling")
    rows = _in_language(rows) if rows is not None else rows
    if rows is not None and features is not None and "features" in rows.columns:
        rows = rows[rows["features"] == features]
        if len(rows) == 0:
            rows, why = None, f"layer x pooling: no rows with features == {features!r}"
    if rows is None:
        return Plot(name, None, why)
    rows = rows.assign(layer=rows["layer"].astype(float))
    panel = _join(rows, ["model"], "") if "model" in rows.columns else pd.Series("", index=rows.index)
    panels = sorted(panel.unique())
    fig = _figure(4.2 * min(len(panels), 3), 3.4 * math.ceil(len(panels) / 3))
    n_points = 0
    for ax, p in zip(_grid(fig, len(panels)), panels, strict=True):
        sub = rows[panel == p]
        extra = ["features"] if "features" in sub.columns and sub["features"].nunique() > 1 else []
        key = _series_key(sub.drop(columns=["model"], errors="ignore"), [*extra, "pooling"])
        sub = sub.assign(_series=key)
        best = _best(sub, ["_series", "layer"]).sort_values(["_series", "layer"])
        for label, line in best.groupby("_series", sort=True):
            ax.errorbar(line["layer"], line["macro_f1"], yerr=_yerr(line), marker="o", capsize=3, label=str(label))
            n_points += len(line)
        ax.set_xlabel("layer (resid_post of block L)")
        ax.set_xticks(sorted(sub["layer"].unique()))
        _f1_axis(ax)
        ax.set_title(f"{p or 'macro-F1 by layer and pooling'} ({_rule(sub)})", fontsize=9)
        ax.legend(fontsize=7, title="pooling", title_fontsize=7)
    return Plot(name, _save(fig, path), None, n_points)


def _threshold_label(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    return f"{float(v):g}"


def plot_binarization(df: pd.DataFrame | None, path: str | Path, *, features: str | None = "sae") -> Plot:
    """Macro-F1 per binarisation threshold ("none" = raw codes), one line per pooling."""
    name = Path(path).stem
    rows, why = _usable(df, ("threshold", "pooling", "macro_f1"), "binarization")
    rows = _in_language(rows) if rows is not None else rows
    if rows is not None and features is not None and "features" in rows.columns:
        rows = rows[rows["features"] == features]
        if len(rows) == 0:
            rows, why = None, f"binarization: no rows with features == {features!r}"
    if rows is None:
        return Plot(name, None, why)
    thr = pd.to_numeric(rows["threshold"], errors="coerce")
    order = ["none"] + [f"{v:g}" for v in sorted(thr.dropna().unique())] if thr.isna().any() else \
        [f"{v:g}" for v in sorted(thr.dropna().unique())]
    rows = rows.assign(_thr=[_threshold_label(v) for v in thr], _series=_series_key(rows, ["pooling"]))
    best = _best(rows, ["_series", "_thr"])
    pos = {t: i for i, t in enumerate(order)}
    fig = _figure(max(4.5, 1.1 * len(order) + 2.5), 3.6)
    ax = fig.add_subplot()
    n_points = 0
    for label, line in best.groupby("_series", sort=True):
        line = line.assign(_x=line["_thr"].map(pos)).sort_values("_x")
        ax.errorbar(line["_x"], line["macro_f1"], yerr=_yerr(line), marker="o", capsize=3, label=str(label))
        n_points += len(line)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("binarization threshold (code > t -> 1)")
    _f1_axis(ax)
    what = "effect of binarizing SAE codes" if features == "sae" else "effect of binarization"
    ax.set_title(f"{what} ({_rule(rows)})", fontsize=9)
    ax.legend(fontsize=7, title="pooling", title_fontsize=7)
    return Plot(name, _save(fig, path), None, n_points)


def plot_sources(df: pd.DataFrame | None, path: str | Path) -> Plot:
    """Best macro-F1 per feature source (sae | hidden | tfidf ...) and task, with 95% CI bars."""
    name = Path(path).stem
    rows, why = _usable(df, ("features", "macro_f1"), "feature sources")
    if rows is None:
        return Plot(name, None, why)
    task_cols = [c for c in ("dataset", "language") if c in rows.columns]
    rows = _in_language(rows)
    task = _join(rows, task_cols, ".") if task_cols else pd.Series("all", index=rows.index)
    rows = rows.assign(_task=task, _src=rows["features"].astype(str))
    best = _best(rows, ["_task", "_src"])
    tasks = sorted(best["_task"].unique())
    sources = sorted(best["_src"].unique())
    width = 0.8 / len(sources)
    fig = _figure(max(4.5, 0.6 * len(tasks) * len(sources) + 2.0), 3.8)
    ax = fig.add_subplot()
    n_points = 0
    for s_i, src in enumerate(sources):
        part = best[best["_src"] == src].set_index("_task").reindex(tasks)
        have = part["macro_f1"].notna().to_numpy()
        x = np.arange(len(tasks))[have] + (s_i - (len(sources) - 1) / 2) * width
        shown = part[have]
        ax.bar(x, shown["macro_f1"], width=width, yerr=_yerr(shown), capsize=3, label=src)
        n_points += int(have.sum())
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
    _f1_axis(ax)
    ax.set_title(f"feature sources ({_rule(rows)}; test macro-F1, 95% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=7, title="features", title_fontsize=7)
    return Plot(name, _save(fig, path), None, n_points)


def plot_transfer(matrix_df: pd.DataFrame | None, path: str | Path, title: str = "cross-lingual transfer") -> Plot:
    """Transfer heatmap (rows: train language, columns: test language); skipped when empty."""
    name = Path(path).stem
    if matrix_df is None or matrix_df.size == 0:
        return Plot(name, None, f"{title}: empty matrix")
    values = matrix_df.to_numpy(dtype=float)
    if np.isnan(values).all():
        return Plot(name, None, f"{title}: every cell is NaN")
    return Plot(name, heatmap_png(matrix_df, path, title), None, int(np.isfinite(values).sum()))


_CONDITION_ORDER = ("size", "imbalance", "noise")
_CONDITION_AXIS = {
    "size": "training rows (train + validation)",
    "imbalance": "minority class share",
    "noise": "share of flipped labels",
}


def plot_conditions(curves_df: pd.DataFrame | None, path: str | Path) -> Plot:
    """One panel per condition, one curve per feature source (mean over repeats, CI band)."""
    name = Path(path).stem
    rows, why = _usable(curves_df, ("condition", "value", "macro_f1"), "conditions")
    if rows is None:
        return Plot(name, None, why)
    first = ["features"] if "features" in rows.columns else (["source"] if "source" in rows.columns else [])
    rows = rows.assign(_series=_series_key(rows, first), value=rows["value"].astype(float))
    found = list(rows["condition"].astype(str).unique())
    conds = [c for c in _CONDITION_ORDER if c in found] + sorted(c for c in found if c not in _CONDITION_ORDER)
    lo, hi = _ci_columns(rows)
    fig = _figure(4.0 * min(len(conds), 3), 3.4 * math.ceil(len(conds) / 3))
    n_points = 0
    for ax, cond in zip(_grid(fig, len(conds)), conds, strict=True):
        sub = rows[rows["condition"].astype(str) == cond]
        aggs = {"macro_f1": ("macro_f1", "mean")}
        if lo and hi:
            aggs.update(lo=(lo, "mean"), hi=(hi, "mean"))
        for label, line in sub.groupby("_series", sort=True):
            pts = line.groupby("value", sort=True).agg(**aggs).reset_index()
            ax.plot(pts["value"], pts["macro_f1"], marker="o", label=str(label))
            if lo and hi and pts[["lo", "hi"]].notna().all().all():
                ax.fill_between(pts["value"], pts["lo"], pts["hi"], alpha=0.2)
            n_points += len(pts)
        if cond == "size" and (sub["value"] > 0).all() and sub["value"].max() / sub["value"].min() > 10:
            ax.set_xscale("log")
            ax.minorticks_off()
            ticks = sorted(sub["value"].unique())
            ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.set_xlabel(_CONDITION_AXIS.get(cond, "value"))
        _f1_axis(ax)
        ax.set_title(cond, fontsize=9)
        ax.legend(fontsize=7)
    return Plot(name, _save(fig, path), None, n_points)


# --------------------------------------------------------------------------- report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def _md(df: pd.DataFrame, max_rows: int) -> str:
    """Markdown table with missing values shown as empty cells (not "nan")."""
    shown = df.head(max_rows).astype(object)
    shown = shown.where(shown.notna(), "")
    text = markdown_table(shown, max_rows=max_rows)
    return text if len(df) <= max_rows else f"{text}\n\n… {len(df) - max_rows} more rows"


def _summary(results: pd.DataFrame) -> pd.DataFrame | None:
    """Selected in-language row per (dataset, language, features), plus the test-best as a labelled oracle column."""
    rows, _ = _usable(results, ("macro_f1",), "summary")
    if rows is None:
        return None
    rows = _in_language(rows)
    keys = [c for c in ("dataset", "language", "features") if c in rows.columns]
    best = _best(rows, keys) if keys else _best(rows.assign(_all=0), ["_all"]).drop(columns="_all")
    cols = [c for c in _TABLE_COLUMNS if c in best.columns]
    out = best.sort_values(keys or ["macro_f1"], kind="stable")[cols].reset_index(drop=True)
    if keys:
        oracle = rows.groupby(keys, sort=False)["macro_f1"].max().rename("oracle_test_best_macro_f1").reset_index()
        out = out.merge(oracle, on=keys, how="left")
    return out


def write_report(
    out_dir: str | Path,
    results: pd.DataFrame | None,
    transfer: Mapping[str, pd.DataFrame] | None = None,
    conditions: pd.DataFrame | None = None,
    extra_md: str = "",
    comparisons: pd.DataFrame | None = None,
    *,
    title: str = "MOSAIC report",
    max_rows: int = 50,
) -> Report:
    """Write every figure that has data plus ``index.md`` (tables + relative PNG links).

    Existing files in ``out_dir`` other than the ones written here are left alone. Skipped
    figures are listed in the index with their reason. Returns the index path, the PNGs it
    links and the skip reasons.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = results if results is not None else pd.DataFrame()
    plots: list[tuple[str, Plot]] = [
        ("Macro-F1 by layer and pooling", plot_layer_pooling(res, out / "layer_pooling.png")),
        ("Binarization threshold", plot_binarization(res, out / "binarization.png")),
        ("SAE vs hidden states vs TF-IDF", plot_sources(res, out / "sources.png")),
    ]
    transfer_plots: list[tuple[str, pd.DataFrame, Plot]] = []
    for tname, matrix in (transfer or {}).items():
        p = plot_transfer(matrix, out / f"transfer_{_slug(tname)}.png", f"transfer: {tname}")
        transfer_plots.append((tname, matrix, p))
    cond_plot = plot_conditions(conditions, out / "conditions.png")

    md: list[str] = [f"# {title}", ""]
    summary = _summary(res)
    md += ["## Selected configuration per source", "",
           "Chosen by validation score (`val_macro_f1`: cross-validated macro-F1 on train+validation); "
           "`macro_f1` is its test score. `oracle_test_best_macro_f1` is the best TEST score of any "
           "configuration: an oracle for reference, not a result.", ""]
    md += [_md(summary, max_rows), ""] if summary is not None else ["No results with a macro-F1.", ""]
    if comparisons is not None and len(comparisons):
        md += ["## SAE vs hidden states vs TF-IDF (paired, selected configurations)", "",
               "Difference of test macro-F1 (SAE − other) on the identical test rows, paired bootstrap 95% "
               "interval, share of resamples where SAE wins. Verdict: interval above 0 → SAE better, below 0 "
               "→ SAE worse, else no difference. Scope `task` selects across layers and SAEs; `overall` "
               "is the mean over tasks.", ""]
        md += [_md(comparisons, max_rows), ""]
    md += ["## Figures", ""]
    for heading, p in plots:
        md += [f"### {heading}", ""]
        md += [f"![{heading}]({p.path.name})", ""] if p.path else [f"Skipped: {p.skipped}.", ""]
    if transfer_plots:
        md += ["## Cross-lingual transfer", "", "Rows: train language; columns: test language; cells: test macro-F1.", ""]
        for tname, matrix, p in transfer_plots:
            md += [f"### {tname}", ""]
            md += [f"![transfer {tname}]({p.path.name})", ""] if p.path else [f"Skipped: {p.skipped}.", ""]
            if matrix is not None and matrix.size:
                md += [_md(matrix.reset_index(), max_rows), ""]
    md += ["## Hard conditions", ""]
    md += [f"![conditions]({cond_plot.path.name})", ""] if cond_plot.path else [f"Skipped: {cond_plot.skipped}.", ""]
    if conditions is not None and len(conditions):
        md += [_md(conditions.reset_index(drop=True), max_rows), ""]
    if len(res):
        order_col = "val_macro_f1" if _by_validation(res) else "macro_f1" if "macro_f1" in res.columns else None
        rows = res.sort_values(order_col, ascending=False, kind="stable") if order_col else res
        cols = [c for c in _TABLE_COLUMNS if c in rows.columns] or list(rows.columns)
        how = "validation score" if order_col == "val_macro_f1" else "test macro-F1 (no validation score)"
        md += [f"## All results (top {max_rows} by {how})", "", _md(rows[cols], max_rows), ""]
    if extra_md.strip():
        md += [extra_md.rstrip(), ""]

    index = out / "index.md"
    with atomic_path(index) as tmp:
        tmp.write_text("\n".join(md))
    all_plots = [p for _, p in plots] + [p for *_, p in transfer_plots] + [cond_plot]
    pngs = [p.path for p in all_plots if p.path is not None]
    skipped = {p.name: str(p.skipped) for p in all_plots if p.path is None}
    return Report(index=index, pngs=pngs, skipped=skipped)
