"""Report figures, one per question, built as matplotlib ``Figure`` objects in the report's one style
(``mosaic_dag.report.style``: no pyplot, Agg canvas).

Every figure is faceted by task (dataset.language, or dataset for the sources figure), colours
each feature set the same way in every figure (``features_colour``), puts its legend outside
the axes (a figure legend right of the panels), draws the majority-class baseline when it is
known, and shows bars where an axis has a single value. Every plotted point is the
validation-selected configuration of its group (``validation_macro_f1``), drawn at its TEST macro-F1
with its 95% bootstrap interval; a table without validation scores falls back to the test-best
and the title says "test-best (oracle)".

A builder returns ``(figure, n_points)`` or raises ``NoData`` with the reason, so no figure is
ever drawn empty.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mosaic_dag.report.rows import NoData, best, ci_columns, in_language, rule, tasks_of, usable, yerr
from mosaic_dag.report.style import (
    FEATURES_MARKERS,
    baseline,
    f1_axis,
    features_colour,
    features_label,
    legend,
    matrix_panel,
    new_figure,
    ordered_features,
    panel_size,
    panels,
    reference,
    wrap,
)
from mosaic_dag.storage import atomic_path

__all__ = [
    "NoData",
    "axis_figure",
    "conditions_figure",
    "heatmap_png",
    "sources_figure",
    "training_curve_figure",
    "transfer_figure",
]


def sources_figure(results: pd.DataFrame | None, baselines: Mapping[str, float] | None = None) -> tuple[Figure, int]:
    """Which source wins: one panel per dataset, one bar group per language, one bar per source (95% CI)."""
    rows = in_language(usable(results, ("features", "macro_f1"), "feature sources"))
    rows = rows.assign(_task=tasks_of(rows), _features=rows["features"].astype(str),
                       _dataset=rows["dataset"].astype(str) if "dataset" in rows.columns else "all",
                       _lang=rows["language"].astype(str) if "language" in rows.columns else "")
    chosen = best(rows, ["_task", "_features"])
    datasets = sorted(chosen["_dataset"].unique())
    feature_sets = ordered_features(chosen["_features"].unique())
    n_lang = max(chosen.groupby("_dataset")["_lang"].nunique())
    fig = new_figure(*panel_size(len(datasets), 2, max(3.2, 0.45 * n_lang * len(feature_sets) + 1.2), 3.2))
    width = 0.8 / len(feature_sets)
    n_points = 0
    for i, (ax, ds) in enumerate(zip(panels(fig, len(datasets), 2), datasets, strict=True)):
        part = chosen[chosen["_dataset"] == ds]
        langs = sorted(part["_lang"].unique())
        for s_i, features in enumerate(feature_sets):
            sub = part[part["_features"] == features].set_index("_lang").reindex(langs)
            have = sub["macro_f1"].notna().to_numpy()
            if not have.any():
                continue
            x = np.arange(len(langs))[have] + (s_i - (len(feature_sets) - 1) / 2) * width
            shown = sub[have]
            ax.bar(x, shown["macro_f1"], width=width, yerr=yerr(shown), capsize=3, color=features_colour(features),
                   label=features_label(features), error_kw={"elinewidth": 1})
            n_points += int(have.sum())
        for j, lang in enumerate(langs):
            baseline(ax, (baselines or {}).get(f"{ds}.{lang}" if lang else ds), j - 0.45, j + 0.45)
        ax.set_xticks(range(len(langs)), [lang or ds for lang in langs])
        ax.set_xlabel("language")
        f1_axis(ax, label=i % 2 == 0)
        ax.set_title(ds, fontsize=10)
    fig.suptitle(wrap(f"Which feature source wins? Test macro-F1 of each source's configuration "
                       f"{rule(rows)}, 95% bootstrap CI", 80), fontsize=10)
    legend(fig)
    return fig, n_points


# which feature sets have a value on each axis; the others are drawn as reference lines
_AXES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "layer": ("layer", ("sae", "hidden"), "layer L (residual stream)", "Effect of the layer"),
    "sae": ("sae", ("sae",), "SAE (layer, width / L0)", "Effect of the SAE (width / L0)"),
    "pooling": ("pooling", ("sae", "hidden"), "pooling over tokens", "Effect of pooling"),
    "threshold": ("threshold", ("sae",), "threshold t (code > t → 1; none: raw)",
                  "Effect of binarizing SAE codes"),
}


def _axis_values(rows: pd.DataFrame, axis: str, sae_labels: Mapping[str, str] | None) -> pd.Series:
    col = _AXES[axis][0]
    if axis == "threshold":
        return rows[col].map(lambda v: "none" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):g}")
    if axis == "layer":
        return rows[col].map(lambda v: f"{int(v)}")
    if axis == "sae":
        layer = rows["layer"].map(lambda v: f"L{int(v)}") if "layer" in rows.columns else ""
        return layer + " " + rows[col].map(lambda s: (sae_labels or {}).get(str(s), str(s)))
    return rows[col].astype(str)


def _axis_order(values: Sequence[str], axis: str) -> list[str]:
    if axis == "threshold":
        nums = sorted(float(v) for v in values if v != "none")
        return (["none"] if "none" in values else []) + [f"{v:g}" for v in nums]
    if axis == "layer":
        return [str(v) for v in sorted(int(v) for v in values)]
    if axis == "sae":
        return sorted(values, key=lambda v: (int(re.match(r"L(\d+)", v).group(1)) if re.match(r"L(\d+)", v) else 0, v))
    return sorted(values)


def axis_figure(results: pd.DataFrame | None, axis: str, baselines: Mapping[str, float] | None = None,
                sae_labels: Mapping[str, str] | None = None) -> tuple[Figure, int]:
    """Macro-F1 against one axis of the paper (layer, SAE, pooling, binarization threshold), one panel per task.

    Each point is the validation-selected configuration among all others at that axis value; a source
    without a value on the axis (TF-IDF for layers, hidden states for SAEs …) is its selected configuration,
    drawn as a dotted reference line with its interval band. One axis value: bars instead of lines."""
    col, varying, xlabel, question = _AXES[axis]
    rows = in_language(usable(results, ("features", "macro_f1"), question.lower()))
    if col not in rows.columns:
        raise NoData(f"{question.lower()}: missing column {col}")
    rows = rows.assign(_task=tasks_of(rows), _features=rows["features"].astype(str))
    on_axis = rows[rows["_features"].isin(varying)]
    if axis != "threshold":
        on_axis = on_axis[on_axis[col].notna()]
    if axis == "pooling":
        on_axis = on_axis[on_axis[col].astype(str) != ""]
    if axis == "sae":
        on_axis = on_axis[on_axis[col].astype(str) != ""]
    if len(on_axis) == 0:
        raise NoData(f"{question.lower()}: no {'/'.join(varying)} rows with a {col}")
    on_axis = on_axis.assign(_x=_axis_values(on_axis, axis, sae_labels))
    refs = best(rows[~rows["_features"].isin(varying)], ["_task", "_features"]) if (~rows["_features"].isin(varying)).any() else rows.iloc[:0]
    points = best(on_axis, ["_task", "_features", "_x"])
    tasks = sorted(points["_task"].unique())
    order = _axis_order(list(points["_x"].unique()), axis)
    pos = {v: i for i, v in enumerate(order)}
    single = len(order) == 1
    per = max(3.0, 0.55 * len(order) + 1.6) if not single else 3.0
    fig = new_figure(*panel_size(len(tasks), 4, per, 2.9))
    feature_sets = [s for s in ordered_features(points["_features"].unique())]
    n_points = 0
    for i, (ax, task) in enumerate(zip(panels(fig, len(tasks), 4), tasks, strict=True)):
        part = points[points["_task"] == task]
        for s_i, features in enumerate(feature_sets):
            line = part[part["_features"] == features].assign(_pos=lambda d: d["_x"].map(pos)).sort_values("_pos")
            if not len(line):
                continue
            if single:
                ax.bar([s_i], line["macro_f1"], width=0.6, yerr=yerr(line), capsize=3, color=features_colour(features),
                       label=features_label(features))
            else:
                ax.errorbar(line["_pos"], line["macro_f1"], yerr=yerr(line), marker=FEATURES_MARKERS.get(features, "D"),
                            capsize=3, color=features_colour(features), label=features_label(features))
            n_points += len(line)
        for _, ref in refs[refs["_task"] == task].iterrows():
            reference(ax, ref, str(ref["_features"]))
        baseline(ax, (baselines or {}).get(task))
        if single:
            ax.set_xticks(range(len(feature_sets)), [features_label(s) for s in feature_sets])
            ax.set_xlim(-0.6, len(feature_sets) - 0.4)
            ax.set_xlabel(f"{xlabel}: {order[0]}")
        else:
            ax.set_xticks(range(len(order)), order, rotation=30 if axis == "sae" else 0,
                          ha="right" if axis == "sae" else "center", fontsize=8)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel(xlabel, fontsize=9)
        f1_axis(ax, label=i % 4 == 0)
        ax.set_title(task, fontsize=10)
    fig.suptitle(wrap(f"{question}: test macro-F1 of the configuration {rule(rows)} at each value, 95% CI", 80),
                 fontsize=10)
    legend(fig)
    return fig, n_points


_CONDITION_ORDER = ("size", "imbalance", "noise")
_CONDITION_AXIS = {
    "size": "training rows (train + validation)",
    "imbalance": "minority class share",
    "noise": "share of flipped labels",
}


def conditions_figure(curves: pd.DataFrame | None, baselines: Mapping[str, float] | None = None) -> tuple[Figure, int]:
    """Hard conditions: one row of panels per task, one panel per condition, one curve per source (mean over
    repeats, CI band). A condition with a single value is drawn as bars."""
    rows = usable(curves, ("condition", "value", "macro_f1"), "conditions")
    # "source": the column's name in curves files written before it was called "features"
    features_col = "features" if "features" in rows.columns else ("source" if "source" in rows.columns else None)
    rows = rows.assign(_features=rows[features_col].astype(str) if features_col else "all", value=rows["value"].astype(float),
                       _task=tasks_of(rows))
    found = list(rows["condition"].astype(str).unique())
    conds = [c for c in _CONDITION_ORDER if c in found] + sorted(c for c in found if c not in _CONDITION_ORDER)
    tasks = sorted(rows["_task"].unique())
    lo, hi = ci_columns(rows)
    n = len(conds) * len(tasks)
    fig = new_figure(*panel_size(n, len(conds), 3.3, 2.8))
    axes = panels(fig, n, len(conds))
    feature_sets = ordered_features(rows["_features"].unique())
    n_points = 0
    for t_i, task in enumerate(tasks):
        for c_i, cond in enumerate(conds):
            ax = axes[t_i * len(conds) + c_i]
            sub = rows[(rows["condition"].astype(str) == cond) & (rows["_task"] == task)]
            aggs: dict[str, Any] = {"macro_f1": ("macro_f1", "mean")}
            if lo and hi:
                aggs.update(lo=(lo, "mean"), hi=(hi, "mean"))
            values = sorted(sub["value"].unique())
            single = len(values) == 1
            for s_i, features in enumerate(feature_sets):
                line = sub[sub["_features"] == features]
                if not len(line):
                    continue
                pts = line.groupby("value", sort=True).agg(**aggs).reset_index()
                err = None
                if lo and hi and pts[["lo", "hi"]].notna().all().all():
                    err = np.vstack([(pts["macro_f1"] - pts["lo"]).clip(lower=0), (pts["hi"] - pts["macro_f1"]).clip(lower=0)])
                if single:
                    ax.bar([s_i], pts["macro_f1"], width=0.6, yerr=err, capsize=3, color=features_colour(features),
                           label=features_label(features))
                else:
                    ax.plot(pts["value"], pts["macro_f1"], marker=FEATURES_MARKERS.get(features, "D"), color=features_colour(features),
                            label=features_label(features))
                    if err is not None:
                        ax.fill_between(pts["value"], pts["lo"], pts["hi"], color=features_colour(features), alpha=0.15, linewidth=0)
                n_points += len(pts)
            if not len(sub):
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                ax.plot([], [])
            baseline(ax, (baselines or {}).get(task))
            if single:
                ax.set_xticks(range(len(feature_sets)), [features_label(s) for s in feature_sets], fontsize=8)
                ax.set_xlim(-0.6, len(feature_sets) - 0.4)
                ax.set_xlabel(f"{_CONDITION_AXIS.get(cond, 'value')} = {values[0]:g}", fontsize=9)
            else:
                if cond == "size" and len(sub) and (sub["value"] > 0).all() and sub["value"].max() / sub["value"].min() > 10:
                    ax.set_xscale("log")
                    ax.minorticks_off()
                    ax.set_xticks(values, [f"{v:g}" for v in values])
                ax.set_xlabel(_CONDITION_AXIS.get(cond, "value"), fontsize=9)
            f1_axis(ax, label=c_i == 0)
            ax.set_title(cond if tasks == ["all"] else f"{task}: {cond}", fontsize=10)
    fig.suptitle(wrap("Hard conditions: test macro-F1 as training data shrinks, skews or gets noisy "
                       "(mean over repeats, 95% CI)", 80), fontsize=10)
    legend(fig)
    return fig, n_points


def transfer_figure(matrices: Mapping[str, pd.DataFrame], title: str) -> tuple[Figure, int]:
    """Train-language × test-language macro-F1, one panel per panel title (e.g. one per feature source)."""
    shown = {k: m for k, m in matrices.items() if m is not None and m.size and not np.isnan(m.to_numpy(float)).all()}
    if not shown:
        raise NoData(f"{title}: empty matrix" if len(matrices) <= 1 else f"{title}: every matrix is empty")
    n_cols = max(m.shape[1] for m in shown.values())
    n_rows = max(m.shape[0] for m in shown.values())
    fig = new_figure(len(shown) * (1.4 + 0.75 * n_cols) + 1.0, 1.6 + 0.6 * n_rows)
    axes = [fig.add_subplot(1, len(shown), i + 1) for i in range(len(shown))]
    im = None
    n_points = 0
    for ax, (name, m) in zip(axes, shown.items(), strict=True):
        im = matrix_panel(ax, m, name)
        n_points += int(np.isfinite(m.to_numpy(float)).sum())
    fig.colorbar(im, ax=axes, shrink=0.85, label="test macro-F1")
    fig.suptitle(title, fontsize=10)
    return fig, n_points



def heatmap_png(matrix_df: pd.DataFrame, path: str | Path,
                title: str = "macro-F1: train language (rows) -> test language (columns)", *,
                vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> Path:
    """One train × test matrix as an annotated heatmap PNG (the transfer panel's style), written atomically."""
    values = matrix_df.to_numpy(dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        raise NoData("matrix_df: is empty or all NaN; nothing to plot")
    n_rows, n_cols = values.shape
    fig = new_figure(1.2 + 0.9 * n_cols, 1.0 + 0.8 * n_rows)
    ax = fig.add_subplot()
    im = matrix_panel(ax, matrix_df, title, xlabel=str(matrix_df.columns.name or "test"),
                      ylabel=str(matrix_df.index.name or "train"), vmin=vmin, vmax=vmax, cmap=cmap)
    fig.colorbar(im, ax=ax, shrink=0.8)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target

_CURVE_PANELS = (("loss", "training loss"), ("l0", "L0 (active latents per token)"), ("dead_fraction", "dead fraction"))


def training_curve_figure(curve: Sequence[Mapping[str, float]], name: str) -> tuple[Figure, int]:
    """An SAE's training curve: loss, L0 and dead fraction against the step, one panel each."""
    frame = pd.DataFrame(list(curve))
    if frame.empty or "step" not in frame.columns:
        raise NoData(f"training curve of {name}: no points")
    panels = [(k, label) for k, label in _CURVE_PANELS if k in frame.columns and frame[k].notna().any()]
    if not panels:
        raise NoData(f"training curve of {name}: no loss, L0 or dead-fraction values")
    fig = new_figure(3.3 * len(panels), 3.0)
    n = 0
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        pts = frame[["step", key]].dropna()
        ax.plot(pts["step"], pts[key], marker="o", markersize=3, color=features_colour("sae"))
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "dead_fraction":
            ax.set_ylim(0, 1)
        n += len(pts)
    fig.suptitle(f"SAE {name}: training curve", fontsize=10)
    return fig, n
