"""TF-IDF + logistic regression baseline on raw texts.

The vectoriser is fitted on train+validation texts only (never test); the classifier
is chosen exactly like the SAE probes by reusing ``probes.linear.fit_logistic``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy.typing as npt
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import Pipeline

from mosaic_dag.probes.fit import ProbeResult
from mosaic_dag.probes.linear import fit_logistic

ANALYZERS: tuple[str, ...] = ("word", "char")

__all__ = ["ANALYZERS", "fit_tfidf", "make_vectorizer"]


def make_vectorizer(
    analyzer: Literal["word", "char"],
    language: str,
    *,
    min_df: int | float = 1,
    max_features: int | None = 200_000,
) -> TfidfVectorizer:
    """Word 1-2 grams (English stop words only for ``language == "en"``) or char_wb 2-5 grams.

    ``max_features`` caps memory on large corpora (char n-grams explode otherwise).
    """
    if analyzer == "word":
        return TfidfVectorizer(
            analyzer="word",
            ngram_range=(1, 2),
            stop_words="english" if language == "en" else None,
            min_df=min_df,
            max_features=max_features,
            sublinear_tf=True,
        )
    if analyzer == "char":
        return TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=(2, 5),
            min_df=min_df,
            max_features=max_features,
            sublinear_tf=True,
        )
    raise ValueError(f"analyzer: unknown value {analyzer!r}; allowed values: {', '.join(ANALYZERS)}")


def fit_tfidf(
    texts_train: Sequence[str],
    y_train: npt.ArrayLike,
    texts_validation: Sequence[str],
    y_validation: npt.ArrayLike,
    texts_test: Sequence[str],
    y_test: npt.ArrayLike,
    analyzer: Literal["word", "char"] = "word",
    language: str = "en",
    *,
    min_df: int | float = 1,
    max_features: int | None = 200_000,
    **logistic_kwargs: Any,
) -> ProbeResult:
    """TF-IDF baseline (classifier ``logistic``); ``result.estimator`` is a Pipeline that takes raw texts.

    TF-IDF rows are already L2-normalised, so no extra scaler is used.
    """
    vec = make_vectorizer(analyzer, language, min_df=min_df, max_features=max_features)
    vec.fit(list(texts_train) + list(texts_validation))
    logistic_kwargs.setdefault("scale", False)
    res = fit_logistic(vec.transform(texts_train), y_train, vec.transform(texts_validation), y_validation,
                       vec.transform(texts_test), y_test, **logistic_kwargs)
    params = {**res.params, "analyzer": analyzer, "language": language, "n_features": len(vec.vocabulary_)}
    return dataclasses.replace(res, params=params, estimator=Pipeline([("tfidf", vec), *res.estimator.steps]))
