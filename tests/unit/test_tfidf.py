"""TF-IDF baseline: vocabulary from train+val only, language-dependent stop words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from mosaic_dag.probes.fit import ProbeResult
from mosaic_dag.probes.interpret import top_latents
from mosaic_dag.probes.io import load_probe, save_probe
from mosaic_dag.features.tfidf import fit_tfidf

POS = ["great", "lovely", "wonderful", "excellent", "superb"]
NEG = ["awful", "terrible", "horrible", "dreadful", "poor"]
FILLER = ["the", "movie", "plot", "actor", "scene", "was", "and", "a", "film", "story"]


def _corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    texts = []
    for label in y:
        words = list(rng.choice(FILLER, size=6)) + list(rng.choice(POS if label else NEG, size=2))
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts, y


def _data() -> tuple[Any, ...]:
    tr, ytr = _corpus(120, 0)
    va, yva = _corpus(40, 1)
    te, yte = _corpus(40, 2)
    te = [t + " zqxjonlyintest þþþ" for t in te]
    return tr, ytr, va, yva, te, yte


def _vocab(res: ProbeResult) -> dict[str, int]:
    vec = res.estimator.steps[0][1]
    assert isinstance(vec, TfidfVectorizer)
    return vec.vocabulary_


@pytest.mark.parametrize("analyzer", ["word", "char"])
def test_tfidf_learns_and_never_sees_test_vocabulary(analyzer: str) -> None:
    tr, ytr, va, yva, te, yte = _data()
    res = fit_tfidf(tr, ytr, va, yva, te, yte, analyzer=analyzer, language="en", Cs=(1.0, 10.0), n_boot=100)
    assert res.classifier == "logistic" and res.params["analyzer"] == analyzer  # the analyzer is its own field
    assert res.metrics.macro_f1 > 0.9
    vocab = _vocab(res)
    assert vocab
    assert not [term for term in vocab if "zqxj" in term or "þ" in term]
    # the returned pipeline works on raw texts and reproduces the test predictions
    np.testing.assert_array_equal(res.estimator.predict(te), res.test_pred)


def test_stop_words_only_for_english() -> None:
    tr, ytr, va, yva, te, yte = _data()
    en = fit_tfidf(tr, ytr, va, yva, te, yte, analyzer="word", language="en", Cs=(1.0,), n_boot=0)
    de = fit_tfidf(tr, ytr, va, yva, te, yte, analyzer="word", language="de", Cs=(1.0,), n_boot=0)
    assert "the" not in _vocab(en) and "and" not in _vocab(en)
    assert "the" in _vocab(de) and "and" in _vocab(de)
    assert "movie" in _vocab(en)
    assert any(" " in term for term in _vocab(en))  # bigrams are present


def test_validation_texts_are_in_vocabulary_and_top_terms_make_sense() -> None:
    tr, ytr, va, yva, te, yte = _data()
    va = [t + " onlyinvalidation" for t in va]
    res = fit_tfidf(tr, ytr, va, yva, te, yte, analyzer="word", language="en", Cs=(1.0,), n_boot=0)
    assert "onlyinvalidation" in _vocab(res)
    names = res.estimator.steps[0][1].get_feature_names_out()
    tops = top_latents(res, feature_names=list(names), top=3)
    assert len(tops[1]) == 3 and len(tops[0]) == 3
    assert all(any(p in str(t) for p in POS) for t, _ in tops[1])
    assert all(any(n in str(t) for n in NEG) for t, _ in tops[0])


def test_unknown_analyzer() -> None:
    tr, ytr, va, yva, te, yte = _data()
    with pytest.raises(ValueError, match=r"^analyzer"):
        fit_tfidf(tr, ytr, va, yva, te, yte, analyzer="bpe", language="en")  # type: ignore[arg-type]


def test_tfidf_pipeline_skops_round_trip(tmp_path: Path) -> None:
    tr, ytr, va, yva, te, yte = _data()
    res = fit_tfidf(tr, ytr, va, yva, te, yte, analyzer="char", language="fr", Cs=(1.0,), n_boot=0)
    path = tmp_path / "tfidf.skops"
    save_probe(res.estimator, path)
    np.testing.assert_array_equal(load_probe(path).predict_proba(te), res.test_proba)
