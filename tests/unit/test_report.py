"""Report: every figure has data, index.md links every PNG, empty inputs are skipped with a reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from mosaic_dag.report import (
    plot_binarization,
    plot_conditions,
    plot_layer_pooling,
    plot_sources,
    plot_transfer,
    write_report,
)


def _results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for lang in ("en", "fr"):
        for layer in (3, 6, 9):
            for pooling in ("mean", "max"):
                for thr in (None, 0.0, 1.0):
                    for clf in ("logistic", "tree"):
                        f1 = 0.5 + 0.03 * layer + (0.05 if pooling == "max" else 0) - (0.1 if clf == "tree" else 0)
                        f1 += 0.02 * rng.random()
                        rows.append({"model": "gemma", "layer": layer, "sae": "btk", "dataset": "tox", "language": lang,
                                     "features": "sae", "pooling": pooling, "threshold": thr, "classifier": clf,
                                     "macro_f1": f1, "macro_f1_ci_low": f1 - 0.05, "macro_f1_ci_high": min(1, f1 + 0.05),
                                     "accuracy": f1, "auroc": f1, "n_train": 100, "n_test": 40})
            rows.append({"model": "gemma", "layer": 6, "dataset": "tox", "language": lang, "features": "hidden",
                         "pooling": "mean", "threshold": None, "classifier": "logistic", "macro_f1": 0.8,
                         "macro_f1_ci_low": 0.7, "macro_f1_ci_high": 0.9, "n_train": 100, "n_test": 40})
        rows.append({"dataset": "tox", "language": lang, "features": "tfidf", "classifier": "tfidf_word",
                     "macro_f1": 0.7, "macro_f1_ci_low": 0.6, "macro_f1_ci_high": 0.8, "n_train": 100, "n_test": 40})
    return pd.DataFrame(rows)


def _curves() -> pd.DataFrame:
    rows = []
    for src, base in (("sae", 0.8), ("tfidf", 0.7)):
        for v in (16, 64, 256):
            rows.append({"features": src, "condition": "size", "value": v, "macro_f1": base - 8 / v,
                         "ci_low": base - 8 / v - 0.05, "ci_high": base - 8 / v + 0.05, "n_train": v})
        for v in (0.0, 0.2, 0.4):
            rows.append({"features": src, "condition": "noise", "value": v, "macro_f1": base - v / 2,
                         "ci_low": np.nan, "ci_high": np.nan, "n_train": 300})
    return pd.DataFrame(rows)


def _assert_real_png(path: Path) -> None:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert colours.shape[0] > 20, f"{path.name} looks blank"


def test_each_plot_has_data(tmp_path: Path) -> None:
    df = _results()
    for fn, name in ((plot_layer_pooling, "lp"), (plot_binarization, "bin"), (plot_sources, "src")):
        p = fn(df, tmp_path / f"{name}.png")
        assert p.written and p.skipped is None and p.n_points > 0, name
        _assert_real_png(tmp_path / f"{name}.png")
    lp = plot_layer_pooling(df[df.language == "en"], tmp_path / "lp_en.png", features="sae")
    assert lp.n_points == 2 * 3  # two poolings x three layers, best classifier/threshold per point
    binz = plot_binarization(df[df.language == "en"], tmp_path / "b_en.png")
    assert binz.n_points == 2 * 3  # two poolings x {none, 0, 1}
    src = plot_sources(df, tmp_path / "s.png")
    assert src.n_points == 2 * 3  # two languages x {sae, hidden, tfidf}
    cond = plot_conditions(_curves(), tmp_path / "c.png")
    assert cond.written and cond.n_points == 2 * 3 * 2
    _assert_real_png(tmp_path / "c.png")
    m = pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=["en", "fr"], columns=["en", "fr"])
    t = plot_transfer(m, tmp_path / "t.png")
    assert t.written and t.n_points == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "call",
    [
        lambda d: plot_layer_pooling(pd.DataFrame(), d / "x.png"),
        lambda d: plot_layer_pooling(None, d / "x.png"),
        lambda d: plot_layer_pooling(pd.DataFrame({"layer": [1], "pooling": ["mean"], "macro_f1": [np.nan]}), d / "x.png"),
        lambda d: plot_binarization(pd.DataFrame({"macro_f1": [0.5]}), d / "x.png"),
        lambda d: plot_binarization(_results().assign(features="hidden"), d / "x.png"),
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
    transfer = {
        "sae L6": pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=pd.Index(["en", "fr"], name="train_language"),
                               columns=pd.Index(["en", "fr"], name="test_language")),
        "empty": pd.DataFrame(),
    }
    rep = write_report(out, _results(), transfer, _curves(), extra_md="## Notes\n\nhello notes")
    assert rep.index == out / "index.md" and rep.index.exists()
    names = sorted(p.name for p in rep.pngs)
    assert names == sorted(["layer_pooling.png", "binarization.png", "sources.png", "transfer_sae-L6.png", "conditions.png"])
    text = rep.index.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == names  # every PNG linked, relative, and nothing else
    for p in rep.pngs:
        assert p.parent == out
        _assert_real_png(p)
    assert rep.skipped == {"transfer_empty": "transfer: empty: empty matrix"}
    assert "Skipped: transfer: empty: empty matrix." in text
    assert "hello notes" in text and "| tfidf |" in text.replace("tfidf |", "tfidf |")
    assert (out / "keep.txt").read_text() == "not ours"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_write_report_with_nothing_writes_index_only(tmp_path: Path) -> None:
    rep = write_report(tmp_path / "r", pd.DataFrame(), None, None)
    assert rep.pngs == [] and [p.name for p in (tmp_path / "r").iterdir()] == ["index.md"]
    assert set(rep.skipped) == {"layer_pooling", "binarization", "sources", "conditions"}
    text = rep.index.read_text()
    assert "![" not in text and text.count("Skipped:") == 4 and "No results" in text
