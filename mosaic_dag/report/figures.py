"""Report figures, one per question, built as matplotlib ``Figure`` objects (no pyplot, Agg canvas).

Every figure is faceted by task (dataset.language, or dataset for the sources figure), colours
each feature source the same way in every figure (``source_colour``), puts its legend outside
the axes (a figure legend right of the panels), draws the majority-class baseline when it is
known, and shows bars where an axis has a single value. Every plotted point is the
validation-selected configuration of its group (``val_macro_f1``), drawn at its TEST macro-F1
with its 95% bootstrap interval; a table without validation scores falls back to the test-best
and the title says "test-best (oracle)".

A builder returns ``(figure, n_points)`` or raises ``NoData`` with the reason, so no figure is
ever drawn empty.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "NoData",
    "SOURCE_COLOURS",
    "axis_figure",
    "conditions_figure",
    "source_colour",
    "source_label",
    "sources_figure",
    "training_curve_figure",
    "transfer_figure",
]

SOURCE_COLOURS: dict[str, str] = {"sae": "#0072b2", "hidden": "#d55e00", "tfidf": "#009e73"}
_EXTRA_COLOURS = ("#cc79a7", "#e69f00", "#56b4e9", "#8c564b", "#7f7f7f", "#000000")
_SOURCE_NAMES = {"sae": "SAE features", "hidden": "hidden states", "tfidf": "TF-IDF"}
_SOURCE_MARKERS = {"sae": "o", "hidden": "s", "tfidf": "^"}
BASELINE_COLOUR = "#555555"
BASELINE_LABEL = "majority-class baseline"
_SOURCE_ORDER = ("sae", "hidden", "tfidf")


class NoData(ValueError):
    """A figure has nothing to draw; the message says why (one line)."""


def source_colour(source: str) -> str:
    """The colour of a feature source, identical in every figure (other sources: a stable pick by name)."""
    if source in SOURCE_COLOURS:
        return SOURCE_COLOURS[source]
    return _EXTRA_COLOURS[zlib.crc32(source.encode()) % len(_EXTRA_COLOURS)]


def source_label(source: str) -> str:
    return _SOURCE_NAMES.get(source, source)


def _ordered_sources(values: Any) -> list[str]:
    found = {str(v) for v in values}
    return [s for s in _SOURCE_ORDER if s in found] + sorted(found - set(_SOURCE_ORDER))


# --------------------------------------------------------------------------- selection helpers


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
    return "val_macro_f1" in df.columns and bool(df["val_macro_f1"].notna().any())


def rule(df: pd.DataFrame) -> str:
    return "selected on validation" if by_validation(df) else "test-best (oracle): no validation score"


def best(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The validation-best row of each group (ties: the partition's own pick, then the first row);
    test-best only without a validation score."""
    col = "val_macro_f1" if by_validation(df) else "macro_f1"
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


# --------------------------------------------------------------------------- layout helpers


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(fig: Figure, n: int, max_cols: int) -> list[Axes]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _panel_size(n: int, max_cols: int, w: float, h: float) -> tuple[float, float]:
    """Figure size for ``n`` panels, with room for the title above and the legend below."""
    cols = min(n, max_cols)
    return max(w * cols, 6.0), h * math.ceil(n / cols) + 1.3


def _f1_axis(ax: Axes, label: bool = True) -> None:
    if label:
        ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)


def _legend(fig: Figure) -> None:
    """One legend for the whole figure, right of every panel (constrained layout keeps it off the axes)."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if not label.startswith("_"):
                seen.setdefault(label, handle)
    if seen:
        width_px = fig.get_figwidth() * 100
        per_entry = max(len(k) for k in seen) * 5.5 + 50  # fontsize 8: about 5.5 px per character, plus the handle
        ncols = max(1, min(len(seen), int(width_px // per_entry)))
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=ncols,
                   fontsize=8, frameon=False)


def _baseline(ax: Axes, value: float | None, x0: float | None = None, x1: float | None = None) -> None:
    if value is None or not math.isfinite(value):
        return
    if x0 is None or x1 is None:
        ax.axhline(value, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, label=BASELINE_LABEL, zorder=4)
    else:
        ax.hlines(value, x0, x1, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, label=BASELINE_LABEL, zorder=4)


def _reference(ax: Axes, row: pd.Series, source: str) -> None:
    """A selected configuration that has no value on this axis: a horizontal line with its interval band."""
    lo, hi = ci_columns(row.to_frame().T)
    colour = source_colour(source)
    ax.axhline(float(row["macro_f1"]), color=colour, linestyle=":", linewidth=1.6,
               label=f"{source_label(source)} (selected, reference)")
    if lo and hi and pd.notna(row[lo]) and pd.notna(row[hi]):
        ax.axhspan(float(row[lo]), float(row[hi]), color=colour, alpha=0.08, linewidth=0)


def _wrap(text: str, width: int = 60) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


# --------------------------------------------------------------------------- figures


def sources_figure(results: pd.DataFrame | None, baselines: Mapping[str, float] | None = None) -> tuple[Figure, int]:
    """Which source wins: one panel per dataset, one bar group per language, one bar per source (95% CI)."""
    rows = in_language(usable(results, ("features", "macro_f1"), "feature sources"))
    rows = rows.assign(_task=tasks_of(rows), _src=rows["features"].astype(str),
                       _dataset=rows["dataset"].astype(str) if "dataset" in rows.columns else "all",
                       _lang=rows["language"].astype(str) if "language" in rows.columns else "")
    chosen = best(rows, ["_task", "_src"])
    datasets = sorted(chosen["_dataset"].unique())
    sources = _ordered_sources(chosen["_src"].unique())
    n_lang = max(chosen.groupby("_dataset")["_lang"].nunique())
    fig = new_figure(*_panel_size(len(datasets), 2, max(3.2, 0.45 * n_lang * len(sources) + 1.2), 3.2))
    width = 0.8 / len(sources)
    n_points = 0
    for i, (ax, ds) in enumerate(zip(_panels(fig, len(datasets), 2), datasets, strict=True)):
        part = chosen[chosen["_dataset"] == ds]
        langs = sorted(part["_lang"].unique())
        for s_i, src in enumerate(sources):
            sub = part[part["_src"] == src].set_index("_lang").reindex(langs)
            have = sub["macro_f1"].notna().to_numpy()
            if not have.any():
                continue
            x = np.arange(len(langs))[have] + (s_i - (len(sources) - 1) / 2) * width
            shown = sub[have]
            ax.bar(x, shown["macro_f1"], width=width, yerr=yerr(shown), capsize=3, color=source_colour(src),
                   label=source_label(src), error_kw={"elinewidth": 1})
            n_points += int(have.sum())
        for j, lang in enumerate(langs):
            _baseline(ax, (baselines or {}).get(f"{ds}.{lang}" if lang else ds), j - 0.45, j + 0.45)
        ax.set_xticks(range(len(langs)), [lang or ds for lang in langs])
        ax.set_xlabel("language")
        _f1_axis(ax, label=i % 2 == 0)
        ax.set_title(ds, fontsize=10)
    fig.suptitle(_wrap(f"Which feature source wins? Test macro-F1 of each source's configuration "
                       f"{rule(rows)}, 95% bootstrap CI", 80), fontsize=10)
    _legend(fig)
    return fig, n_points


# which sources have a value on each axis; the others are drawn as reference lines
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
    rows = rows.assign(_task=tasks_of(rows), _src=rows["features"].astype(str))
    on_axis = rows[rows["_src"].isin(varying)]
    if axis != "threshold":
        on_axis = on_axis[on_axis[col].notna()]
    if axis == "pooling":
        on_axis = on_axis[on_axis[col].astype(str) != ""]
    if axis == "sae":
        on_axis = on_axis[on_axis[col].astype(str) != ""]
    if len(on_axis) == 0:
        raise NoData(f"{question.lower()}: no {'/'.join(varying)} rows with a {col}")
    on_axis = on_axis.assign(_x=_axis_values(on_axis, axis, sae_labels))
    refs = best(rows[~rows["_src"].isin(varying)], ["_task", "_src"]) if (~rows["_src"].isin(varying)).any() else rows.iloc[:0]
    points = best(on_axis, ["_task", "_src", "_x"])
    tasks = sorted(points["_task"].unique())
    order = _axis_order(list(points["_x"].unique()), axis)
    pos = {v: i for i, v in enumerate(order)}
    single = len(order) == 1
    per = max(3.0, 0.55 * len(order) + 1.6) if not single else 3.0
    fig = new_figure(*_panel_size(len(tasks), 4, per, 2.9))
    sources = [s for s in _ordered_sources(points["_src"].unique())]
    n_points = 0
    for i, (ax, task) in enumerate(zip(_panels(fig, len(tasks), 4), tasks, strict=True)):
        part = points[points["_task"] == task]
        for s_i, src in enumerate(sources):
            line = part[part["_src"] == src].assign(_pos=lambda d: d["_x"].map(pos)).sort_values("_pos")
            if not len(line):
                continue
            if single:
                ax.bar([s_i], line["macro_f1"], width=0.6, yerr=yerr(line), capsize=3, color=source_colour(src),
                       label=source_label(src))
            else:
                ax.errorbar(line["_pos"], line["macro_f1"], yerr=yerr(line), marker=_SOURCE_MARKERS.get(src, "D"),
                            capsize=3, color=source_colour(src), label=source_label(src))
            n_points += len(line)
        for _, ref in refs[refs["_task"] == task].iterrows():
            _reference(ax, ref, str(ref["_src"]))
        _baseline(ax, (baselines or {}).get(task))
        if single:
            ax.set_xticks(range(len(sources)), [source_label(s) for s in sources])
            ax.set_xlim(-0.6, len(sources) - 0.4)
            ax.set_xlabel(f"{xlabel}: {order[0]}")
        else:
            ax.set_xticks(range(len(order)), order, rotation=30 if axis == "sae" else 0,
                          ha="right" if axis == "sae" else "center", fontsize=8)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel(xlabel, fontsize=9)
        _f1_axis(ax, label=i % 4 == 0)
        ax.set_title(task, fontsize=10)
    fig.suptitle(_wrap(f"{question}: test macro-F1 of the configuration {rule(rows)} at each value, 95% CI", 80),
                 fontsize=10)
    _legend(fig)
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
    src_col = "features" if "features" in rows.columns else ("source" if "source" in rows.columns else None)
    rows = rows.assign(_src=rows[src_col].astype(str) if src_col else "all", value=rows["value"].astype(float),
                       _task=tasks_of(rows))
    found = list(rows["condition"].astype(str).unique())
    conds = [c for c in _CONDITION_ORDER if c in found] + sorted(c for c in found if c not in _CONDITION_ORDER)
    tasks = sorted(rows["_task"].unique())
    lo, hi = ci_columns(rows)
    n = len(conds) * len(tasks)
    fig = new_figure(*_panel_size(n, len(conds), 3.3, 2.8))
    axes = _panels(fig, n, len(conds))
    sources = _ordered_sources(rows["_src"].unique())
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
            for s_i, src in enumerate(sources):
                line = sub[sub["_src"] == src]
                if not len(line):
                    continue
                pts = line.groupby("value", sort=True).agg(**aggs).reset_index()
                err = None
                if lo and hi and pts[["lo", "hi"]].notna().all().all():
                    err = np.vstack([(pts["macro_f1"] - pts["lo"]).clip(lower=0), (pts["hi"] - pts["macro_f1"]).clip(lower=0)])
                if single:
                    ax.bar([s_i], pts["macro_f1"], width=0.6, yerr=err, capsize=3, color=source_colour(src),
                           label=source_label(src))
                else:
                    ax.plot(pts["value"], pts["macro_f1"], marker=_SOURCE_MARKERS.get(src, "D"), color=source_colour(src),
                            label=source_label(src))
                    if err is not None:
                        ax.fill_between(pts["value"], pts["lo"], pts["hi"], color=source_colour(src), alpha=0.15, linewidth=0)
                n_points += len(pts)
            if not len(sub):
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                ax.plot([], [])
            _baseline(ax, (baselines or {}).get(task))
            if single:
                ax.set_xticks(range(len(sources)), [source_label(s) for s in sources], fontsize=8)
                ax.set_xlim(-0.6, len(sources) - 0.4)
                ax.set_xlabel(f"{_CONDITION_AXIS.get(cond, 'value')} = {values[0]:g}", fontsize=9)
            else:
                if cond == "size" and len(sub) and (sub["value"] > 0).all() and sub["value"].max() / sub["value"].min() > 10:
                    ax.set_xscale("log")
                    ax.minorticks_off()
                    ax.set_xticks(values, [f"{v:g}" for v in values])
                ax.set_xlabel(_CONDITION_AXIS.get(cond, "value"), fontsize=9)
            _f1_axis(ax, label=c_i == 0)
            ax.set_title(cond if tasks == ["all"] else f"{task}: {cond}", fontsize=10)
    fig.suptitle(_wrap("Hard conditions: test macro-F1 as training data shrinks, skews or gets noisy "
                       "(mean over repeats, 95% CI)", 80), fontsize=10)
    _legend(fig)
    return fig, n_points


def _matrix_panel(ax: Axes, matrix: pd.DataFrame, title: str) -> Any:
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
    ax.set_xlabel("test language")
    ax.set_ylabel("train language")
    ax.set_title(title, fontsize=10)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if np.isnan(v) or v > 0.5 else "white")
    return im


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
        im = _matrix_panel(ax, m, name)
        n_points += int(np.isfinite(m.to_numpy(float)).sum())
    fig.colorbar(im, ax=axes, shrink=0.85, label="test macro-F1")
    fig.suptitle(title, fontsize=10)
    return fig, n_points


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
        ax.plot(pts["step"], pts[key], marker="o", markersize=3, color=source_colour("sae"))
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "dead_fraction":
            ax.set_ylim(0, 1)
        n += len(pts)
    fig.suptitle(f"SAE {name}: training curve", fontsize=10)
    return fig, n
