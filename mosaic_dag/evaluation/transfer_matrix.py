"""Train x test matrices: fit a probe on one language (or dataset), score it on every one's test split.

The probe for a train language is fitted exactly once with the probes API (hyper-parameters
from that language's train+validation rows only), so the diagonal of the matrix *is* the
in-language probe on the same held-out test rows. Off-diagonal cells reuse the fitted model
on the other languages' test rows; nothing about those rows ever reaches the fit.

Features must live in one column space across languages. SAE codes and hidden states do by
construction; for TF-IDF, ``tfidf_transfer_matrix`` fits the vectoriser on the train language
only and applies it unchanged to the other languages' texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from mosaic_dag.evaluation.schema import SCORE_COLUMNS, score_fields
from mosaic_dag.features.tfidf import fit_tfidf
from mosaic_dag.probes.fit import FitFn, ProbeResult, Split, predict
from mosaic_dag.probes.linear import DEFAULT_CS, fit_logistic
from mosaic_dag.probes.metrics import evaluate

__all__ = [
    "LONG_COLUMNS",
    "Split",
    "TextSplit",
    "TransferResult",
    "check_label_space",
    "offdiag_mean",
    "tfidf_transfer_matrix",
    "transfer_matrix",
]


LONG_COLUMNS: tuple[str, ...] = ("train_language", "test_language", *SCORE_COLUMNS)


@dataclass(frozen=True, eq=False)
class TransferResult:
    """``long``: one row per (train, test) language pair; ``matrix``: macro-F1, rows = train.

    ``predictions`` has one row per scored test row (train_language, test_language, id,
    y_true, y_pred); ``probes`` keeps the fitted probe of every train language.
    """

    long: pd.DataFrame
    matrix: pd.DataFrame
    predictions: pd.DataFrame
    probes: dict[str, ProbeResult] = field(default_factory=dict)


def check_label_space(labels_by_language: Mapping[str, frozenset[Any] | set[Any]]) -> None:
    """Raise one-line ValueError when languages do not share one label set (transfer is then undefined)."""
    langs = list(labels_by_language)
    if not langs:
        raise ValueError("splits: need at least one language")
    ref = frozenset(labels_by_language[langs[0]])
    bad = [lang for lang in langs[1:] if frozenset(labels_by_language[lang]) != ref]
    if bad:
        detail = "; ".join(
            f"{lang}={sorted(map(str, labels_by_language[lang]))}" for lang in [langs[0], *bad]
        )
        raise ValueError(
            f"labels: languages {', '.join(bad)} do not share the label set of {langs[0]} ({detail}); "
            "map them to one label space first"
        )


def _assemble(
    languages: Sequence[str],
    probes: dict[str, ProbeResult],
    scored: dict[tuple[str, str], tuple[Any, np.ndarray, np.ndarray, np.ndarray]],
    train_languages: Sequence[str] | None = None,
) -> TransferResult:
    """Build the tidy table, the square matrix and the predictions from per-cell results."""
    rows = []
    preds = []
    for (tr, te), (metrics, ids, y_true, y_pred) in scored.items():
        rows.append({"train_language": tr, "test_language": te, **score_fields(metrics)})
        preds.append(
            pd.DataFrame(
                {"train_language": tr, "test_language": te, "id": ids, "y_true": y_true, "y_pred": y_pred}
            )
        )
    long = pd.DataFrame(rows, columns=list(LONG_COLUMNS))
    matrix = (
        long.pivot(index="train_language", columns="test_language", values="macro_f1")
        .reindex(index=list(train_languages or languages), columns=list(languages))
        .astype(float)
    )
    matrix.index.name = "train_language"
    matrix.columns.name = "test_language"
    predictions = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    return TransferResult(long=long, matrix=matrix, predictions=predictions, probes=probes)


def transfer_matrix(
    splits: Mapping[str, Split],
    fit: FitFn | None = None,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    train_languages: Sequence[str] | None = None,
) -> TransferResult:
    """Fit once per train language, then score on every language's test split.

    ``fit`` defaults to ``fit_logistic``; it gets the train language's own test split so the
    diagonal cell is exactly that in-language probe's metrics. Bootstrap CIs of every cell use
    ``seed``. ``train_languages`` restricts the rows (default: every language).
    """
    if not splits:
        raise ValueError("splits: need at least one language")
    langs = list(splits)
    check_label_space({lang: splits[lang].labels for lang in langs})
    widths = {lang: splits[lang].n_features for lang in langs}
    if len(set(widths.values())) != 1:
        raise ValueError(f"splits: feature widths differ across languages ({widths}); use one column space")
    fit_fn: FitFn = fit if fit is not None else fit_logistic
    rows_langs = list(train_languages) if train_languages is not None else langs
    unknown = [lang for lang in rows_langs if lang not in splits]
    if unknown:
        raise ValueError(f"train_languages: {unknown} are not in splits ({langs})")

    probes: dict[str, ProbeResult] = {}
    scored: dict[tuple[str, str], tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = {}
    for tr in rows_langs:
        s = splits[tr]
        probe = fit_fn(s.X_train, s.y_train, s.X_validation, s.y_validation, s.X_test, s.y_test, seed=seed, n_boot=n_boot)
        probes[tr] = probe
        n_fit = probe.metrics.n_train
        for te in langs:
            t = splits[te]
            if te == tr:
                scored[(tr, te)] = (probe.metrics, t.ids_test, t.y_test, probe.test_pred)
                continue
            pred, proba = predict(probe.estimator, t.X_test)
            m = evaluate(t.y_test, pred, proba, probe.classes, seed, n_train=n_fit, n_boot=n_boot)
            scored[(tr, te)] = (m, t.ids_test, t.y_test, pred)
    return _assemble(langs, probes, scored, rows_langs)


TextSplit = tuple[
    Sequence[str], npt.ArrayLike, Sequence[str], npt.ArrayLike, Sequence[str], npt.ArrayLike
]


def tfidf_transfer_matrix(
    texts_by_language: Mapping[str, TextSplit],
    analyzer: Literal["word", "char"] = "word",
    *,
    seed: int = 0,
    n_boot: int = 1000,
    Cs: Sequence[float] = DEFAULT_CS,
    min_df: float = 1,
    max_features: int | None = 200_000,
    ids_test: Mapping[str, npt.ArrayLike] | None = None,
    languages: Mapping[str, str] | None = None,
    **logistic_kwargs: Any,
) -> TransferResult:
    """TF-IDF transfer: per train language, the vectoriser sees that language's train+validation texts only.

    ``texts_by_language[lang] = (train_texts, y_train, validation_texts, y_validation, test_texts, y_test)``.
    The diagonal equals ``fit_tfidf`` on that language; other languages' test texts go through
    the same fitted vectoriser (words it never saw simply have no column). English stop words
    are used only when the train language is ``en`` (as in ``fit_tfidf``); ``languages`` gives each
    key's language when the keys are not languages (cross-dataset matrices).
    """
    if not texts_by_language:
        raise ValueError("texts_by_language: need at least one language")
    langs = list(texts_by_language)
    for lang in langs:
        if len(texts_by_language[lang]) != 6:
            raise ValueError(
                f"texts_by_language[{lang!r}]: expected (train_texts, y_train, validation_texts, y_validation, test_texts, y_test)"
            )
    check_label_space(
        {
            lang: frozenset(
                np.unique(np.concatenate([np.asarray(v[1]), np.asarray(v[3]), np.asarray(v[5])])).tolist()
            )
            for lang, v in texts_by_language.items()
        }
    )
    ids = {
        lang: np.asarray(ids_test[lang]) if ids_test is not None and lang in ids_test
        else np.arange(len(texts_by_language[lang][4]))
        for lang in langs
    }
    probes: dict[str, ProbeResult] = {}
    scored: dict[tuple[str, str], tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = {}
    for tr in langs:
        ttr, ytr, tva, yva, tte, yte = texts_by_language[tr]
        probe = fit_tfidf(
            ttr, ytr, tva, yva, tte, yte, analyzer=analyzer, language=(languages or {}).get(tr, tr),
            min_df=min_df, max_features=max_features, Cs=Cs, seed=seed, n_boot=n_boot, **logistic_kwargs,
        )
        probes[tr] = probe
        for te in langs:
            y_te = np.asarray(texts_by_language[te][5])
            if te == tr:
                scored[(tr, te)] = (probe.metrics, ids[te], y_te, probe.test_pred)
                continue
            pred, proba = predict(probe.estimator, list(texts_by_language[te][4]))
            m = evaluate(y_te, pred, proba, probe.classes, seed, n_train=probe.metrics.n_train, n_boot=n_boot)
            scored[(tr, te)] = (m, ids[te], y_te, pred)
    return _assemble(langs, probes, scored)


def offdiag_mean(matrix: pd.DataFrame) -> float:
    """Mean macro-F1 over cross-language cells (train language != test language); NaN for one language."""
    values = matrix.to_numpy(dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    return float(off.mean()) if off.size else float("nan")
