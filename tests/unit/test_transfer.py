"""Cross-lingual transfer: the diagonal is the in-language probe, a flipped language collapses."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.image import imread

from mosaic_dag.probes.ksparse import fit_ksparse
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.report.figures import heatmap_png
from mosaic_dag.evaluation.transfer_matrix import LONG_COLUMNS, Split, offdiag_mean, tfidf_transfer_matrix, transfer_matrix

FIT = functools.partial(fit_logistic, Cs=(0.1, 1.0), n_splits=3)


def _lang(seed: int, flip: bool, n: int = 120, width: int = 8) -> Split:
    """Same feature distribution in every language; ``flip`` swaps the label mapping."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width))
    y = (X[:, 0] + 0.1 * rng.normal(size=n) > 0).astype(int)
    X[:, 0] *= 3.0
    if flip:
        y = 1 - y
    a, b = int(0.6 * n), int(0.75 * n)
    return Split(X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:], ids_test=np.array([f"{seed}-{i}" for i in range(b, n)]))


def test_flipped_language_collapses_and_diagonal_is_in_language_probe() -> None:
    splits = {"en": _lang(1, flip=False), "xx": _lang(2, flip=True)}
    res = transfer_matrix(splits, FIT, seed=3, n_boot=50)
    m = res.matrix
    assert list(m.index) == ["en", "xx"] and list(m.columns) == ["en", "xx"]
    assert m.loc["en", "en"] > 0.9 and m.loc["xx", "xx"] > 0.9
    assert m.loc["en", "xx"] < 0.2 and m.loc["xx", "en"] < 0.2
    assert list(res.long.columns) == list(LONG_COLUMNS)
    assert len(res.long) == 4
    # the diagonal is exactly an in-language fit on the same rows (same seed, same CI)
    s = splits["xx"]
    alone = FIT(s.X_train, s.y_train, s.X_validation, s.y_validation, s.X_test, s.y_test, seed=3, n_boot=50)
    row = res.long.set_index(["train_language", "test_language"]).loc[("xx", "xx")]
    assert row["macro_f1"] == alone.metrics.macro_f1
    assert row["ci_low"] == alone.metrics.macro_f1_ci_low
    assert row["n_train"] == alone.metrics.n_train == s.y_train.size + s.y_validation.size
    assert row["n_test"] == s.y_test.size
    # off-diagonal cells score the other language's test rows with the train language's probe
    off = res.predictions.query("train_language == 'en' and test_language == 'xx'")
    assert list(off["id"]) == list(s.ids_test)
    np.testing.assert_array_equal(off["y_pred"].to_numpy(), res.probes["en"].estimator.predict(s.X_test))


def test_sparse_ksparse_probe_transfers_with_its_selected_columns() -> None:
    dense = {"a": _lang(4, flip=False), "b": _lang(5, flip=False)}
    splits = {
        k: Split(sp.csr_matrix(v.X_train), v.y_train, sp.csr_matrix(v.X_validation), v.y_validation, sp.csr_matrix(v.X_test), v.y_test)
        for k, v in dense.items()
    }
    fit = functools.partial(fit_ksparse, k=2, Cs=(1.0,), n_splits=3)
    res = transfer_matrix(splits, fit, seed=0, n_boot=0)
    assert (res.matrix.to_numpy() > 0.85).all()
    assert res.long["ci_low"].isna().all()  # n_boot=0 -> no CI


def test_train_languages_restricts_rows_only() -> None:
    splits = {"en": _lang(1, flip=False), "fr": _lang(2, flip=False), "de": _lang(3, flip=True)}
    res = transfer_matrix(splits, FIT, n_boot=0, train_languages=["fr"])
    assert list(res.matrix.index) == ["fr"] and list(res.matrix.columns) == ["en", "fr", "de"]
    assert set(res.probes) == {"fr"} and len(res.long) == 3
    with pytest.raises(ValueError, match="not in splits"):
        transfer_matrix(splits, FIT, n_boot=0, train_languages=["xx"])


def test_mismatched_label_sets_name_the_languages() -> None:
    a = _lang(1, flip=False)
    b = _lang(2, flip=False)
    c = Split(b.X_train, b.y_train + 5, b.X_validation, b.y_validation + 5, b.X_test, b.y_test + 5)
    with pytest.raises(ValueError, match=r"languages de do not share the label set of en") as err:
        transfer_matrix({"en": a, "fr": b, "de": c}, FIT, n_boot=0)
    assert "\n" not in str(err.value)


def test_width_mismatch_is_refused() -> None:
    a = _lang(1, flip=False)
    b = _lang(2, flip=False, width=5)
    with pytest.raises(ValueError, match="feature widths differ"):
        transfer_matrix({"en": a, "fr": b}, FIT, n_boot=0)


def _texts(lang: str, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    words = {
        "en": (["good", "lovely", "kind"], ["stupid", "idiot", "awful"], ["the", "day", "post"]),
        "fr": (["bon", "gentil", "good"], ["idiot", "stupide", "nul"], ["le", "jour", "merci"]),
    }[lang]
    y = np.arange(n) % 2
    texts = []
    for label in y:
        pol = words[0] if label == 0 else words[1]
        texts.append(" ".join([*rng.choice(pol, 2), *rng.choice(words[2], 2)]))
    return texts, y


def test_tfidf_vectoriser_is_fitted_on_the_train_language_only() -> None:
    data = {}
    for i, lang in enumerate(("en", "fr")):
        t, y = _texts(lang, 60, i)
        data[lang] = (t[:36], y[:36], t[36:45], y[36:45], t[45:], y[45:])
    res = tfidf_transfer_matrix(data, "word", seed=0, n_boot=20, Cs=(1.0,), n_splits=3)
    vocab_en = res.probes["en"].estimator.named_steps["tfidf"].vocabulary_
    vocab_fr = res.probes["fr"].estimator.named_steps["tfidf"].vocabulary_
    assert "stupide" not in vocab_en and "merci" not in vocab_en  # French-only words
    assert "stupide" in vocab_fr and "lovely" not in vocab_fr
    assert res.matrix.loc["en", "en"] > 0.9 and res.matrix.loc["fr", "fr"] > 0.9
    assert res.matrix.shape == (2, 2) and not res.matrix.isna().any().any()
    with pytest.raises(ValueError, match="expected"):
        tfidf_transfer_matrix({"en": data["en"][:4]}, "word")  # type: ignore[dict-item]


def test_heatmap_is_written_atomically_and_not_blank(tmp_path: Path) -> None:
    m = pd.DataFrame([[0.95, 0.1], [np.nan, 0.9]], index=["en", "fr"], columns=["en", "fr"])
    out = heatmap_png(m, tmp_path / "heat.png", "transfer")
    img = imread(out)
    assert img.ndim == 3 and img.shape[0] > 100
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 10
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="empty or all NaN"):
        heatmap_png(pd.DataFrame(), tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_offdiag_mean_ignores_in_language_cells() -> None:
    m = pd.DataFrame([[0.9, 0.2], [0.4, 0.8]], index=["en", "fr"], columns=["en", "fr"])
    assert offdiag_mean(m) == pytest.approx(0.3)
    assert np.isnan(offdiag_mean(m.iloc[:1, :1]))
