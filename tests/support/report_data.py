"""Small synthetic inputs for the report and interpretation tests: a results table over layers, poolings,
thresholds and classifiers; hard-condition curves; pooled SAE codes with one planted latent and its probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mosaic_dag.evaluation.sweeps import ProbeRun, ProbeSpec
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.tree import fit_tree


def results() -> pd.DataFrame:
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
        rows.append({"dataset": "tox", "language": lang, "features": "tfidf", "classifier": "logistic", "analyzer": "word",
                     "macro_f1": 0.7, "macro_f1_ci_low": 0.6, "macro_f1_ci_high": 0.8, "n_train": 100, "n_test": 40})
    return pd.DataFrame(rows)


def curves() -> pd.DataFrame:
    rows = []
    for src, base in (("sae", 0.8), ("tfidf", 0.7)):
        for v in (16, 64, 256):
            rows.append({"features": src, "condition": "size", "value": v, "macro_f1": base - 8 / v,
                         "ci_low": base - 8 / v - 0.05, "ci_high": base - 8 / v + 0.05, "n_train": v})
        for v in (0.0, 0.2, 0.4):
            rows.append({"features": src, "condition": "noise", "value": v, "macro_f1": base - v / 2,
                         "ci_low": np.nan, "ci_high": np.nan, "n_train": 300})
    return pd.DataFrame(rows)


def planted_codes():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    X = np.zeros((n, 8))
    X[:, 3] = np.where(y == 1, rng.uniform(1, 3, n), 0.0)  # latent 3 fires on class 1 only
    X[:, 5] = rng.uniform(0, 1, n) * (rng.random(n) < 0.3)  # noise latent, 30% active
    split = np.array(["train"] * 180 + ["validation"] * 60 + ["test"] * 60)
    frame = pd.DataFrame({"id": [f"t{i}" for i in range(n)], "text": [f"text number {i}" for i in range(n)],
                          "label": y, "label_name": np.where(y == 1, "toxic", "fine"), "split": split})
    return sp.csr_matrix(X), y, frame


def planted_runs(X, y):
    tr, va, te = np.arange(180), np.arange(180, 240), np.arange(240, 300)
    args = (X[tr], y[tr], X[va], y[va], X[te], y[te])
    spec = lambda c: ProbeSpec("sae", "mean", None, None, c, None)  # noqa: E731
    ids = [f"t{i}" for i in te]
    return [ProbeRun(spec("logistic"), fit_logistic(*args, n_boot=0), ids),
            ProbeRun(spec("tree"), fit_tree(*args, max_depths=(2,), min_samples_leafs=(1,), n_boot=0), ids)]
