"""Report: every figure has data in every panel, legends sit outside the axes, one colour per feature source,
index.md links every PNG, index.html embeds them, empty inputs are skipped with a reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import warnings

from matplotlib.colors import to_hex
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import imread

from mosaic_dag.report import figures as F
from mosaic_dag.report import style as S
from mosaic_dag.report.markdown import (
    plot_binarization,
    plot_conditions,
    plot_layers,
    plot_pooling,
    plot_saes,
    plot_sources,
    plot_transfer,
    write_report,
)
from tests.support.report_data import curves, results


def _assert_real_png(path: Path) -> None:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert colours.shape[0] > 20, f"{path.name} looks blank"


def test_each_plot_has_data(tmp_path: Path) -> None:
    df = results()
    for fn, name in ((plot_layers, "lp"), (plot_binarization, "bin"), (plot_sources, "src"), (plot_pooling, "pool"),
                     (plot_saes, "saes")):
        p = fn(df, tmp_path / f"{name}.png")
        assert p.written and p.skipped is None and p.n_points > 0, name
        assert p.svg == tmp_path / f"{name}.svg" and p.svg.read_text().lstrip().startswith("<?xml")
        _assert_real_png(tmp_path / f"{name}.png")
    en = df[df.language == "en"]
    assert plot_layers(en, tmp_path / "lp_en.png").n_points == 3 + 1  # SAE at three layers, hidden at one
    assert plot_binarization(en, tmp_path / "b_en.png").n_points == 3  # SAE at {none, 0, 1}
    assert plot_pooling(en, tmp_path / "p_en.png").n_points == 2 + 1  # SAE mean/max, hidden mean
    src = plot_sources(df, tmp_path / "s.png")
    assert src.n_points == 2 * 3  # two languages x {sae, hidden, tfidf}
    cond = plot_conditions(curves(), tmp_path / "c.png")
    assert cond.written and cond.n_points == 2 * 3 * 2
    _assert_real_png(tmp_path / "c.png")
    m = pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=["en", "fr"], columns=["en", "fr"])
    t = plot_transfer(m, tmp_path / "t.png")
    assert t.written and t.n_points == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _all_figures() -> dict[str, Figure]:
    df = results()
    base = {"tox.en": 0.33, "tox.fr": 0.4}
    m = pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=["en", "fr"], columns=["en", "fr"])
    figs = {axis: F.axis_figure(df, axis, base)[0] for axis in ("layer", "sae", "pooling", "threshold")}
    figs["sources"] = F.sources_figure(df, base)[0]
    figs["conditions"] = F.conditions_figure(curves())[0]
    figs["transfer"] = F.transfer_figure({"SAE": m, "hidden": m}, "transfer")[0]
    return figs


def _colours_by_source(fig: Figure) -> dict[str, set[str]]:
    names = {S.features_label(s): s for s in ("sae", "hidden", "tfidf")}
    out: dict[str, set[str]] = {}
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.patches, *ax.collections, *ax.containers]:
            label = artist.get_label() if hasattr(artist, "get_label") else ""
            src = next((s for name, s in names.items() if label.startswith(name)), None)
            if src is None:
                continue
            if hasattr(artist, "patches"):  # a bar container
                colours = {to_hex(p.get_facecolor()) for p in artist.patches}
            elif hasattr(artist, "lines"):  # an errorbar container
                colours = {to_hex(artist.lines[0].get_color())}
            elif hasattr(artist, "get_color") and not hasattr(artist, "get_facecolor"):
                colours = {to_hex(artist.get_color())}
            else:
                colours = {to_hex(artist.get_facecolor()[0] if len(np.shape(artist.get_facecolor())) == 2 else artist.get_facecolor())}
            out.setdefault(src, set()).update(colours)
    return out


def test_figures_read_at_a_glance() -> None:
    """From the figure objects: data in every panel, the legend outside every panel and inside the figure,
    one colour per source (the same in every figure), no layout warning when drawn."""
    seen: dict[str, set[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = _all_figures()
        for name, fig in figs.items():
            fig.canvas.draw()
            panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
            assert panels, name
            for ax in panels:
                assert ax.lines or ax.patches or ax.images or ax.collections, f"{name}: empty panel {ax.get_title()}"
                assert ax.get_title() or name == "transfer", name
            renderer = fig.canvas.get_renderer()
            fig_box = fig.bbox
            for legend in fig.legends:
                box = legend.get_window_extent(renderer)
                for ax in panels:
                    assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: legend over {ax.get_title()}"
                assert fig_box.x0 - 1 <= box.x0 and box.x1 <= fig_box.x1 + 1 and box.y0 >= fig_box.y0 - 1, name
            assert all(ax.get_legend() is None for ax in panels), f"{name}: a legend inside a panel"
            if name != "transfer":
                assert fig.legends, f"{name}: no legend"
            colours = _colours_by_source(fig)
            for src, cs in colours.items():
                assert cs == {S.features_colour(src)}, (name, src, cs)
                seen.setdefault(src, set()).update(cs)
            flat = [c for cs in colours.values() for c in cs]
            assert len(flat) == len(set(flat)), f"{name}: two sources share a colour"
    assert {"sae", "hidden", "tfidf"} <= set(seen) and all(len(c) == 1 for c in seen.values())
    assert len({S.features_colour(s) for s in ("sae", "hidden", "tfidf")}) == 3


def test_one_axis_value_is_drawn_as_bars_and_baseline_is_drawn() -> None:
    one_layer = results()
    one_layer = one_layer[one_layer["layer"].isna() | (one_layer["layer"] == 6)]
    fig, n = F.axis_figure(one_layer, "layer", {"tox.en": 0.33})
    panel = next(ax for ax in fig.axes if ax.get_title() == "tox.en")
    bars = [p for c in panel.containers if isinstance(c, BarContainer) for p in c.patches]
    assert len(bars) == 2 and n == 4  # SAE and hidden at the single layer, bars not a dot on a line
    baseline = [ln for ln in panel.lines if ln.get_label() == S.BASELINE_LABEL]
    assert baseline and baseline[0].get_ydata()[0] == pytest.approx(0.33)
    cond = curves()
    cond = cond[(cond["condition"] != "noise") | (cond["value"] == 0.2)]  # noise: one value
    fig, _ = F.conditions_figure(cond)
    noise = next(ax for ax in fig.axes if ax.get_title() == "noise")
    assert len([p for c in noise.containers if isinstance(c, BarContainer) for p in c.patches]) == 2
    assert not [ln for ln in noise.lines if ln.get_label() != S.BASELINE_LABEL and len(ln.get_xdata()) > 1]


@pytest.mark.parametrize(
    "call",
    [
        lambda d: plot_layers(pd.DataFrame(), d / "x.png"),
        lambda d: plot_layers(None, d / "x.png"),
        lambda d: plot_layers(pd.DataFrame({"features": ["sae"], "layer": [1], "macro_f1": [np.nan]}), d / "x.png"),
        lambda d: plot_saes(results().assign(sae=""), d / "x.png"),
        lambda d: plot_binarization(pd.DataFrame({"macro_f1": [0.5]}), d / "x.png"),
        lambda d: plot_binarization(results().assign(features="hidden"), d / "x.png"),
        lambda d: plot_sources(pd.DataFrame(columns=["features", "macro_f1"]), d / "x.png"),
        lambda d: plot_conditions(pd.DataFrame(), d / "x.png"),
        lambda d: plot_transfer(pd.DataFrame(), d / "x.png"),
        lambda d: plot_transfer(pd.DataFrame([[np.nan]], index=["en"], columns=["en"]), d / "x.png"),
    ],
)
def test_empty_inputs_skip_with_a_reason_and_write_nothing(tmp_path: Path, call) -> None:  # type: ignore[no-untyped-def]
    p = call(tmp_path)
    assert not p.written and p.path is None and p.n_points == 0
    assert p.skipped and "\n" not in p.skipped
    assert list(tmp_path.iterdir()) == []


def test_write_report_links_every_png(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    idx = pd.Index(["en", "fr"], name="train_language")
    cols = pd.Index(["en", "fr"], name="test_language")
    transfer = {
        "gemma.L6.btk tox sae": pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=idx, columns=cols),
        "gemma.L6.btk tox hidden": pd.DataFrame([[0.8, 0.6], [0.55, 0.8]], index=idx, columns=cols),
        "empty": pd.DataFrame(),
    }
    with warnings.catch_warnings():  # no "constrained_layout ... collapsed" (or any layout) warning when saving
        warnings.filterwarnings("error", message=".*(layout|collapsed).*")
        rep = write_report(out, results(), transfer, curves(), extra_md="## Notes\n\nhello notes",
                           provenance={"mosaic.config_hash": "abc123", "mosaic.version.torch": "9.9"})
    assert rep.index == out / "index.md" and rep.index.exists()
    names = sorted(p.name for p in rep.pngs)
    assert names == sorted(["sources.png", "layers.png", "saes.png", "pooling.png", "binarization.png",
                            "transfer_tox-gemma-layer-6-SAE-btk.png", "conditions.png"])
    assert sorted(p.name for p in rep.svgs) == sorted(n.replace(".png", ".svg") for n in names)
    text = rep.index.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == names  # every PNG linked, relative, and nothing else
    for p in rep.pngs:
        assert p.parent == out
        _assert_real_png(p)
    assert rep.skipped == {"transfer_empty": "Cross-lingual transfer, empty: test macro-F1, train language (rows) → "
                                             "test language (columns): empty matrix"}
    assert "hello notes" in text and "| tfidf |" in text
    assert "abc123" in text
    assert (out / "keep.txt").read_text() == "not ours"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the HTML page: every figure embedded (no file links for images), sortable tables, provenance footer
    page = rep.html.read_text()
    srcs = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert len(srcs) == len(names) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "class='sortable'" in page and "addEventListener('click'" in page
    assert "<footer>" in page and "abc123" in page.split("<footer>")[1] and "hello notes" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch from a server


def test_write_report_with_nothing_writes_index_only(tmp_path: Path) -> None:
    rep = write_report(tmp_path / "r", pd.DataFrame(), None, None)
    assert rep.pngs == [] and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["index.html", "index.md"]
    assert set(rep.skipped) == {"layers", "saes", "pooling", "binarization", "sources", "conditions"}
    text = rep.index.read_text()
    assert "![" not in text and text.count("Skipped:") == 6 and "No results" in text
    assert "<img" not in rep.html.read_text()


def test_many_tasks_still_lay_out(tmp_path: Path) -> None:
    """Five languages (the multilingual case): panels wrap, nothing collapses, the legend stays off the panels."""
    base = results()
    many = pd.concat([base[base.language == "en"].assign(language=lang) for lang in ("en", "es", "de", "ru", "zh")])
    curve_rows = pd.concat([curves().assign(dataset="tox", language=lang) for lang in ("en", "es", "de", "ru", "zh")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = [F.axis_figure(many, a)[0] for a in ("layer", "sae", "pooling", "threshold")]
        figs += [F.sources_figure(many)[0], F.conditions_figure(curve_rows)[0]]
        for fig in figs:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            box = fig.legends[0].get_window_extent(renderer)
            panels = [ax for ax in fig.axes]
            assert all(ax.get_window_extent(renderer).height > 50 for ax in panels)
            assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in panels)
    assert len(figs[0].axes) == 5 and len(figs[-1].axes) == 5 * 2
