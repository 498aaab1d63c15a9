"""The report: figures (PNG + SVG), ``index.md`` and a self-contained ``index.html`` from tidy results tables.

Every plot function takes a tidy DataFrame and returns a ``Plot``: the files it wrote, or the
reason it wrote nothing (missing columns, no rows with a score). A figure is never written
without data. Figures come from ``mosaic_dag.report.figures`` (one per question, faceted by task,
one colour per feature set); every file is written atomically, ``index.html`` before
``index.md``, and ``index.md`` last, so a reader never sees a link to a missing file.

Every plotted point is the configuration with the best VALIDATION score (``validation_macro_f1``) of
its group, drawn at its own test macro-F1 and CI. A table without ``validation_macro_f1`` falls back
to the test-best, and the figure's title then says "test-best (oracle)".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mosaic_dag.evaluation.schema import TABLE_COLUMNS
from mosaic_dag.report import figures as F
from mosaic_dag.report.html import data_uri, html_page
from mosaic_dag.report.rows import NoData, best, by_validation, in_language, usable
from mosaic_dag.report.style import features_label
from mosaic_dag.storage import atomic_path
from mosaic_dag.tables import markdown_table

__all__ = [
    "FIGURE_DPI",
    "embedded_markdown",
    "figure_markdown",
    "Plot",
    "Report",
    "plot_binarization",
    "plot_conditions",
    "plot_layers",
    "plot_pooling",
    "plot_saes",
    "plot_sources",
    "plot_transfer",
    "transfer_groups",
    "write_report",
]

FIGURE_DPI = 150
_TABLE_COLUMNS: tuple[str, ...] = TABLE_COLUMNS


@dataclass(frozen=True)
class Plot:
    """Outcome of one plot call: ``path`` (PNG) and ``svg`` when written, else ``skipped`` says why."""

    name: str
    path: Path | None
    skipped: str | None = None
    n_points: int = 0
    svg: Path | None = None

    @property
    def written(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Report:
    """What ``write_report`` produced: the index, the HTML page, the figures it links and the skipped ones."""

    index: Path
    pngs: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)
    html: Path | None = None
    svgs: list[Path] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)  # heading -> PNG


def write_figure(fig: Figure, png: Path) -> tuple[Path, Path]:
    """PNG (150 dpi) and SVG beside it, each atomically (tests turn matplotlib's layout warnings into errors)."""
    svg = png.with_suffix(".svg")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    with atomic_path(svg) as tmp:
        fig.savefig(tmp, format="svg")
    return png, svg


def figure_markdown(build: Callable[[], tuple[Figure, int]], alt: str, dpi: int = 100) -> str:
    """A figure as a markdown image with a ``data:`` URI (what Dagster's metadata view renders inline), or a line
    saying why there is no figure."""
    import base64
    import io

    try:
        fig, _ = build()
    except NoData as e:
        return f"No figure: {e}."
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')})"


def embedded_markdown(index: Path) -> str:
    """``index.md`` with its relative image links replaced by ``data:`` URIs, so it renders where the files are not
    served (Dagster's metadata view, MLflow's markdown preview)."""
    def embed(m: re.Match[str]) -> str:
        path = index.parent / m.group(2)
        return f"![{m.group(1)}]({data_uri(path)})" if path.is_file() else m.group(0)

    text = re.sub(r"^Vector version: .*$\n?", "", index.read_text(), flags=re.M)  # file links cannot resolve there
    return re.sub(r"!\[([^\]]*)\]\(([^)\s:]+)\)", embed, text)


def _plot(path: str | Path, build: Callable[[], tuple[Figure, int]]) -> Plot:
    target = Path(path)
    try:
        fig, n = build()
    except NoData as e:
        return Plot(target.stem, None, str(e))
    png, svg = write_figure(fig, target)
    return Plot(target.stem, png, None, n, svg)


def plot_sources(df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None) -> Plot:
    """Selected macro-F1 per feature source, per dataset and language, with 95% CI bars."""
    return _plot(path, lambda: F.sources_figure(df, baselines))


def plot_layers(df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None) -> Plot:
    return _plot(path, lambda: F.axis_figure(df, "layer", baselines))


def plot_saes(df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None,
              sae_labels: Mapping[str, str] | None = None) -> Plot:
    return _plot(path, lambda: F.axis_figure(df, "sae", baselines, sae_labels))


def plot_pooling(df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None) -> Plot:
    return _plot(path, lambda: F.axis_figure(df, "pooling", baselines))


def plot_binarization(df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None) -> Plot:
    return _plot(path, lambda: F.axis_figure(df, "threshold", baselines))


def plot_conditions(curves_df: pd.DataFrame | None, path: str | Path, baselines: Mapping[str, float] | None = None) -> Plot:
    return _plot(path, lambda: F.conditions_figure(curves_df, baselines))


def plot_transfer(matrix_df: pd.DataFrame | Mapping[str, pd.DataFrame] | None, path: str | Path,
                  title: str = "cross-lingual transfer") -> Plot:
    """Transfer heatmap(s): one matrix, or a mapping panel title -> matrix drawn side by side."""
    if matrix_df is None:
        return Plot(Path(path).stem, None, f"{title}: empty matrix")
    panels = dict(matrix_df) if isinstance(matrix_df, Mapping) else {"": matrix_df}
    return _plot(path, lambda: F.transfer_figure(panels, title))


_TRANSFER_KEY = re.compile(r"^(?P<model>[^ ]+)\.L(?P<layer>\d+)\.(?P<sae>[^ ]+) (?P<dataset>[^ ]+) (?P<features>[^ ]+)$")


def transfer_groups(transfer: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, pd.DataFrame]]:
    """'<model>.L<layer>.<sae> <dataset> <features>' matrices grouped per target and dataset, panels titled by
    features (the SAE's name only on the SAE panel); other names stay alone."""
    groups: dict[str, dict[str, pd.DataFrame]] = {}
    for name, matrix in transfer.items():
        m = _TRANSFER_KEY.match(name)
        if not m:
            groups.setdefault(name, {})[""] = matrix
            continue
        features, layer = m["features"], m["layer"]
        title = {"sae": f"SAE {m['sae']} (L{layer})", "hidden": f"hidden states (L{layer})"}.get(features,
                                                                                             features_label(features))
        groups.setdefault(f"{m['dataset']} ({m['model']}, layer {layer}, SAE {m['sae']})", {})[title] = matrix
    return groups


# --------------------------------------------------------------------------- report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def _md(df: pd.DataFrame, max_rows: int) -> str:
    """Markdown table with missing values shown as empty cells (not "nan")."""
    shown = df.head(max_rows).astype(object)
    shown = shown.where(shown.notna(), "")
    text = markdown_table(shown, max_rows=max_rows)
    return text if len(df) <= max_rows else f"{text}\n\n… {len(df) - max_rows} more rows"


def summary_table(results: pd.DataFrame) -> pd.DataFrame | None:
    """Selected in-language row per (dataset, language, features), plus the test-best as a labelled oracle column."""
    try:
        rows = in_language(usable(results, ("macro_f1",), "summary"))
    except NoData:
        return None
    keys = [c for c in ("dataset", "language", "features") if c in rows.columns]
    chosen = best(rows, keys) if keys else best(rows.assign(_all=0), ["_all"]).drop(columns="_all")
    cols = [c for c in _TABLE_COLUMNS if c in chosen.columns]
    out = chosen.sort_values(keys or ["macro_f1"], kind="stable")[cols].reset_index(drop=True)
    if keys:
        oracle = rows.groupby(keys, sort=False)["macro_f1"].max().rename("oracle_test_best_macro_f1").reset_index()
        out = out.merge(oracle, on=keys, how="left")
    return out


_SELECTED_NOTE = ("Chosen by validation score (`validation_macro_f1`: cross-validated macro-F1 on train+validation); "
                  "`macro_f1` is its test score. `oracle_test_best_macro_f1` is the best TEST score of any "
                  "configuration: an oracle for reference, not a result.")
_PAIRED_NOTE = ("Difference of test macro-F1 (SAE − other) on the identical test rows, paired bootstrap 95% "
                "interval, share of resamples where SAE wins. Verdict: interval above 0 → SAE better, below 0 "
                "→ SAE worse, else no difference. Scope `task` selects across layers and SAEs; `overall` "
                "is the mean over tasks.")


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
    baselines: Mapping[str, float] | None = None,
    sae_labels: Mapping[str, str] | None = None,
    provenance: Mapping[str, str] | None = None,
    sections_html: str = "",
) -> Report:
    """Write every figure that has data (PNG + SVG), ``index.html`` and ``index.md``.

    ``baselines``: majority-class macro-F1 per task ('dataset.language'), drawn in the figures.
    ``sae_labels``: SAE name -> label with width / L0 for the SAE axis. ``provenance``: the
    footer's config hash, code version and library versions. ``sections_html``: extra HTML
    sections (latent interpretation). Existing files in ``out_dir`` other than the ones written
    here are left alone. Skipped figures are listed with their reason.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = results if results is not None else pd.DataFrame()
    plots: list[tuple[str, Plot]] = [
        ("Which feature source wins?", plot_sources(res, out / "sources.png", baselines)),
        ("Effect of the layer", plot_layers(res, out / "layers.png", baselines)),
        ("Effect of the SAE (width / L0)", plot_saes(res, out / "saes.png", baselines, sae_labels)),
        ("Effect of pooling", plot_pooling(res, out / "pooling.png", baselines)),
        ("Effect of binarizing SAE codes", plot_binarization(res, out / "binarization.png", baselines)),
    ]
    transfer_plots: list[tuple[str, dict[str, pd.DataFrame], Plot]] = []
    for gname, panels in transfer_groups(transfer or {}).items():
        p = plot_transfer(panels, out / f"transfer_{_slug(gname)}.png",
                          f"Cross-lingual transfer, {gname}: test macro-F1, train language (rows) → test language (columns)")
        transfer_plots.append((gname, panels, p))
    cond_plot = plot_conditions(conditions, out / "conditions.png", baselines)

    summary = summary_table(res)
    md: list[str] = [f"# {title}", "", "## Selected configuration per source", "", _SELECTED_NOTE, ""]
    md += [_md(summary, max_rows), ""] if summary is not None else ["No results with a macro-F1.", ""]
    if comparisons is not None and len(comparisons):
        md += ["## SAE vs hidden states vs TF-IDF (paired, selected configurations)", "", _PAIRED_NOTE, ""]
        md += [_md(comparisons, max_rows), ""]
    md += ["## Figures", ""]

    def figure_md(heading: str, p: Plot) -> list[str]:
        if not p.path:
            return [f"Skipped: {p.skipped}.", ""]
        return [f"![{heading}]({p.path.name})", "", f"Vector version: [{p.svg.name}]({p.svg.name})" if p.svg else "", ""]

    for heading, p in plots:
        md += [f"### {heading}", "", *figure_md(heading, p)]
    if transfer_plots:
        md += ["## Cross-lingual transfer", "", "Rows: train language; columns: test language; cells: test macro-F1.", ""]
        for gname, panels, p in transfer_plots:
            md += [f"### {gname}", "", *figure_md(f"transfer {gname}", p)]
            for ptitle, matrix in panels.items():
                if matrix is not None and matrix.size:
                    md += ([f"{ptitle}:", ""] if ptitle else []) + [_md(matrix.reset_index(), max_rows), ""]
    md += ["## Hard conditions", "", *figure_md("conditions", cond_plot)]
    if conditions is not None and len(conditions):
        md += [_md(conditions.reset_index(drop=True), max_rows), ""]
    all_rows = None
    if len(res):
        order_col = "validation_macro_f1" if by_validation(res) else "macro_f1" if "macro_f1" in res.columns else None
        rows = res.sort_values(order_col, ascending=False, kind="stable") if order_col else res
        cols = [c for c in _TABLE_COLUMNS if c in rows.columns] or list(rows.columns)
        how = "validation score" if order_col == "validation_macro_f1" else "test macro-F1 (no validation score)"
        all_rows = rows[cols]
        md += [f"## All results (top {max_rows} by {how})", "", _md(all_rows, max_rows), ""]
    if extra_md.strip():
        md += [extra_md.rstrip(), ""]
    if provenance:
        md += ["## Provenance", "", *[f"- {k}: `{v}`" for k, v in provenance.items()], ""]

    all_plots = [p for _, p in plots] + [p for *_, p in transfer_plots] + [cond_plot]
    figures = {h: p.path for h, p in plots if p.path} | {f"transfer {g}": p.path for g, _, p in transfer_plots if p.path}
    if cond_plot.path:
        figures["Hard conditions"] = cond_plot.path
    html = out / "index.html"
    page = html_page(
        title,
        summary=summary, summary_note=_SELECTED_NOTE, comparisons=comparisons, comparisons_note=_PAIRED_NOTE,
        figures=[(h, p.path, p.skipped) for h, p in plots],
        transfer=[(g, p.path, p.skipped, panels) for g, panels, p in transfer_plots],
        conditions=(cond_plot.path, cond_plot.skipped, conditions),
        results=all_rows, extra_md=extra_md, provenance=provenance or {}, sections_html=sections_html,
    )
    with atomic_path(html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    index = out / "index.md"
    with atomic_path(index) as tmp:
        tmp.write_text("\n".join(md))
    pngs = [p.path for p in all_plots if p.path is not None]
    svgs = [p.svg for p in all_plots if p.svg is not None]
    skipped = {p.name: str(p.skipped) for p in all_plots if p.path is None}
    return Report(index=index, pngs=pngs, skipped=skipped, html=html, svgs=svgs, figures=figures)
