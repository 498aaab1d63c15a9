"""The report's one plotting style: a colour, label and marker per feature set (sae | hidden | tfidf), the
figure canvas (matplotlib ``Figure`` on Agg, no pyplot), panels, the F1 axis, one legend outside the axes,
the majority-class baseline and the annotated train × test matrix panel."""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mosaic_dag.report.rows import ci_columns

__all__ = [
    "BASELINE_COLOUR",
    "BASELINE_LABEL",
    "FEATURES_COLOURS",
    "features_colour",
    "features_label",
    "new_figure",
]

FEATURES_COLOURS: dict[str, str] = {"sae": "#0072b2", "hidden": "#d55e00", "tfidf": "#009e73"}
_EXTRA_COLOURS = ("#cc79a7", "#e69f00", "#56b4e9", "#8c564b", "#7f7f7f", "#000000")
_FEATURES_NAMES = {"sae": "SAE features", "hidden": "hidden states", "tfidf": "TF-IDF"}
FEATURES_MARKERS = {"sae": "o", "hidden": "s", "tfidf": "^"}
BASELINE_COLOUR = "#555555"
BASELINE_LABEL = "majority-class baseline"
_FEATURES_ORDER = ("sae", "hidden", "tfidf")


def features_colour(features: str) -> str:
    """The colour of a feature set, identical in every figure (others: a stable pick by name)."""
    if features in FEATURES_COLOURS:
        return FEATURES_COLOURS[features]
    return _EXTRA_COLOURS[zlib.crc32(features.encode()) % len(_EXTRA_COLOURS)]


def features_label(features: str) -> str:
    return _FEATURES_NAMES.get(features, features)


def ordered_features(values: Any) -> list[str]:
    found = {str(v) for v in values}
    return [s for s in _FEATURES_ORDER if s in found] + sorted(found - set(_FEATURES_ORDER))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panels(fig: Figure, n: int, max_cols: int) -> list[Axes]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def panel_size(n: int, max_cols: int, w: float, h: float) -> tuple[float, float]:
    """Figure size for ``n`` panels, with room for the title above and the legend below."""
    cols = min(n, max_cols)
    return max(w * cols, 6.0), h * math.ceil(n / cols) + 1.3


def f1_axis(ax: Axes, label: bool = True) -> None:
    if label:
        ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)


def legend(fig: Figure) -> None:
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


def baseline(ax: Axes, value: float | None, x0: float | None = None, x1: float | None = None) -> None:
    if value is None or not math.isfinite(value):
        return
    if x0 is None or x1 is None:
        ax.axhline(value, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, label=BASELINE_LABEL, zorder=4)
    else:
        ax.hlines(value, x0, x1, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, label=BASELINE_LABEL, zorder=4)


def reference(ax: Axes, row: pd.Series, features: str) -> None:
    """A selected configuration that has no value on this axis: a horizontal line with its interval band."""
    lo, hi = ci_columns(row.to_frame().T)
    colour = features_colour(features)
    ax.axhline(float(row["macro_f1"]), color=colour, linestyle=":", linewidth=1.6,
               label=f"{features_label(features)} (selected, reference)")
    if lo and hi and pd.notna(row[lo]) and pd.notna(row[hi]):
        ax.axhspan(float(row[lo]), float(row[hi]), color=colour, alpha=0.08, linewidth=0)


def wrap(text: str, width: int = 60) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


def matrix_panel(ax: Axes, matrix: pd.DataFrame, title: str, *, xlabel: str = "test language",
                 ylabel: str = "train language", vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> Any:
    """A train × test matrix as an annotated heatmap (NaN cells: "n/a"); returns the image for a colour bar."""
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    mid = (vmin + vmax) / 2
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if np.isnan(v) or v > mid else "white")
    return im
