"""Probes: planted features are found, test rows never steer selection, runs are exact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.tree import DecisionTreeClassifier

from mosaic_dag.probes import ksparse, linear, metrics
from mosaic_dag.probes.fit import ProbeResult
from mosaic_dag.probes.interpret import top_latents
from mosaic_dag.probes.io import load_probe, save_probe
from mosaic_dag.probes.ksparse import fit_ksparse, select_features
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.metrics import Metrics, evaluate, majority_baseline_f1
from mosaic_dag.probes.tree import fit_tree
from tests.support.sparse import forbid_densify, random_csr

WIDTH = 20_000
PLANTED = {0: 111, 1: 5_000, 2: 12_345}
SMALL_CS = (0.1, 1.0)


def _col(c: int, width: int) -> int:
    """Column of the planted latent for class ``c`` at this width."""
    return PLANTED[c] % width


def _planted(
    n: int, seed: int, n_classes: int = 3, width: int = WIDTH, nnz: int = 30
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Noise SAE-like codes plus one latent per class that fires (mostly) on that class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    noise = random_csr(rng, n, width, nnz).tolil()
    for c in range(n_classes):
        col = _col(c, width)
        noise[:, col] = 0
        fires = (y == c) & (rng.random(n) < 0.97)
        noise[np.flatnonzero(fires), col] = (1.0 + rng.random(int(fires.sum()))).reshape(-1, 1)
    return noise.tocsr().astype(np.float32), y


def _split(X: Any, y: np.ndarray) -> tuple[Any, ...]:
    n = y.size
    a, b = int(n * 0.6), int(n * 0.8)
    return X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]


# ---------------------------------------------------------------------------- planted


def test_logistic_finds_planted_multiclass_on_wide_sparse() -> None:
    X, y = _planted(900, seed=0)
    res = fit_logistic(*_split(X, y), Cs=SMALL_CS, n_boot=200)
    assert isinstance(res, ProbeResult) and isinstance(res.metrics, Metrics)
    assert res.metrics.macro_f1 > 0.9
    assert res.metrics.auroc > 0.9
    assert res.metrics.macro_f1_ci_low <= res.metrics.macro_f1 <= res.metrics.macro_f1_ci_high
    assert res.metrics.n_train == 720 and res.metrics.n_test == 180
    assert res.params["C"] in SMALL_CS
    assert res.test_proba is not None and res.test_proba.shape == (180, 3)
    tops = top_latents(res, top=3)
    assert set(tops) == {0, 1, 2}
    for c, col in PLANTED.items():
        assert tops[c][0][0] == col
        assert tops[c][0][1] > 0
    named = top_latents(res, feature_names=[f"L{i}" for i in range(WIDTH)], top=1)
    assert named[1] == [(f"L{PLANTED[1]}", tops[1][0][1])]


def test_ksparse_k1_selects_planted_binary() -> None:
    X, y = _planted(600, seed=1, n_classes=2)
    res = fit_ksparse(*_split(X, y), k=1, Cs=SMALL_CS, n_boot=100)
    assert res.classifier == "ksparse" and res.k == 1
    assert res.selected_features is not None
    assert res.selected_features.tolist() == [PLANTED[1]] or res.selected_features.tolist() == [PLANTED[0]]
    assert res.metrics.macro_f1 > 0.9
    tops = top_latents(res)
    # indices map back to the original 20k columns
    assert [i for i, _ in tops[0] + tops[1]] == res.selected_features.tolist()


def test_select_features_ranks_by_class_mean_difference() -> None:
    X = np.array(
        [[1.0, 0.0, 5.0], [1.0, 0.0, 5.0], [0.0, 0.2, 5.0], [0.0, 0.0, 5.0]], dtype=np.float32
    )
    y = np.array(["a", "a", "b", "b"])
    # col 0: |1 - 0| = 1; col 1: |0 - 0.1| = 0.1; col 2: 0
    np.testing.assert_array_equal(select_features(X, y, 3), [0, 1, 2])
    np.testing.assert_array_equal(select_features(sp.csr_matrix(X), y, 2), [0, 1])
    assert select_features(X, y, 10).size == 3


def test_ksparse_selection_uses_train_rows_only() -> None:
    X, y = _planted(600, seed=2, n_classes=2)
    Xtr, ytr, Xva, yva, Xte, yte = _split(X, y)
    # Plant a perfect feature in val/test only: selecting it would reveal a leak.
    leak_col = 7
    Xva, Xte = Xva.tolil(), Xte.tolil()
    Xva[:, leak_col] = (yva * 100.0).reshape(-1, 1)
    Xte[:, leak_col] = (yte * 100.0).reshape(-1, 1)
    Xtr = Xtr.tolil()
    Xtr[:, leak_col] = 0
    res = fit_ksparse(Xtr.tocsr(), ytr, Xva.tocsr(), yva, Xte.tocsr(), yte, k=5, Cs=SMALL_CS, n_boot=0)
    assert res.selected_features is not None and leak_col not in res.selected_features


# ---------------------------------------------------------------------------- leakage


class _FitRecorder:
    """Wraps ``cls.fit`` to record every matrix an estimator is fitted on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.seen: list[Any] = []
        original = cls.fit

        def fit(est: Any, X: Any, y: Any = None, *a: Any, **kw: Any) -> Any:
            self.seen.append(X)
            return original(est, X, y, *a, **kw)

        monkeypatch.setattr(cls, "fit", fit)


def _tag_test_rows(X: sp.csr_matrix, marker_col: int, n_test: int) -> sp.csr_matrix:
    """Put a marker value in ``marker_col`` on the last ``n_test`` rows (the test split)."""
    lil = X.tolil()
    lil[:, marker_col] = 0
    lil[X.shape[0] - n_test :, marker_col] = 1.0
    return lil.tocsr()


@pytest.mark.parametrize("kind", ["logistic", "tree", "ksparse"])
def test_no_fit_ever_sees_test_rows(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    X, y = _planted(500, seed=3, n_classes=2, width=2_000)
    n_test = 100
    marker = 1_999
    X = _tag_test_rows(X, marker, n_test)
    parts = _split(X, y)
    assert parts[4].shape[0] == n_test
    rec_lr = _FitRecorder(monkeypatch, LogisticRegression)
    rec_tree = _FitRecorder(monkeypatch, DecisionTreeClassifier)
    searched: list[Any] = []  # the matrices a logistic search gets before it drops never-active columns
    real_search = linear.fit_on_active_columns
    monkeypatch.setattr(linear, "fit_on_active_columns", lambda search, X, y: searched.append(X) or real_search(search, X, y))
    if kind == "logistic":
        fit_logistic(*parts, Cs=SMALL_CS, n_boot=0)
    elif kind == "tree":
        fit_tree(*parts, max_depths=(2, None), min_samples_leafs=(1,), n_boot=0)
    else:
        # keep the marker column so the fitted columns can still reveal test rows
        monkeypatch.setattr(ksparse, "select_features", lambda X, y, k: np.array([_col(1, 2_000), marker]))
        fit_ksparse(*parts, k=2, Cs=SMALL_CS, n_boot=0)
    seen = rec_lr.seen + rec_tree.seen
    assert len(seen) >= 2
    assert kind == "tree" or searched
    for Xf in searched:  # full width: the marker column is there to be read
        col = marker if Xf.shape[1] > 2 else 1
        assert sp.csr_matrix(Xf)[:, col].nnz == 0, "a logistic search saw test rows"
    full = {2_000, 2}
    for Xf in seen:
        if Xf.shape[1] in full:
            col = marker if Xf.shape[1] > 2 else 1
            assert sp.csr_matrix(Xf)[:, col].nnz == 0, "a fit saw test rows"
        else:  # a fit on the active columns of a searched matrix (checked above)
            assert Xf.shape[1] < max(m.shape[1] for m in searched)
        assert Xf.shape[0] <= 400


@pytest.mark.parametrize("kind", ["logistic", "tree", "ksparse"])
def test_selection_is_blind_to_test_split(kind: str) -> None:
    """Swapping in an adversarial test split (flipped labels, other rows) changes nothing fitted."""
    X, y = _planted(500, seed=4, n_classes=2, width=3_000)
    Xtr, ytr, Xva, yva, Xte, yte = _split(X, y)
    Xadv = X[:100]
    yadv = 1 - y[:100]

    def run(Xt: Any, yt: np.ndarray) -> ProbeResult:
        if kind == "logistic":
            return fit_logistic(Xtr, ytr, Xva, yva, Xt, yt, Cs=(0.001, 0.1, 10.0), n_boot=0)
        if kind == "tree":
            return fit_tree(Xtr, ytr, Xva, yva, Xt, yt, max_depths=(1, 3, None), n_boot=0)
        return fit_ksparse(Xtr, ytr, Xva, yva, Xt, yt, k=5, Cs=(0.001, 0.1, 10.0), n_boot=0)

    a, b = run(Xte, yte), run(Xadv, yadv)
    assert a.params == b.params
    assert a.selection_score == b.selection_score
    assert np.isfinite(a.validation_macro_f1) and a.validation_macro_f1 == b.validation_macro_f1  # the validation score never sees test
    pa, pb = a.estimator.predict_proba(Xte), b.estimator.predict_proba(Xte)  # k-sparse: the selector is a step
    np.testing.assert_array_equal(pa, pb)
    assert b.metrics.macro_f1 < 0.5 < a.metrics.macro_f1  # the adversarial split really is adversarial


# ---------------------------------------------------------------------------- determinism


def test_two_runs_are_identical() -> None:
    X, y = _planted(400, seed=5)
    parts = _split(X, y)
    for fit in (
        lambda: fit_logistic(*parts, Cs=SMALL_CS, n_boot=300),
        lambda: fit_tree(*parts, max_depths=(3, None), n_boot=300),
        lambda: fit_ksparse(*parts, k=20, Cs=SMALL_CS, n_boot=300),
    ):
        a, b = fit(), fit()
        assert a.metrics == b.metrics
        assert a.params == b.params
        np.testing.assert_array_equal(a.test_pred, b.test_pred)
        np.testing.assert_array_equal(a.test_proba, b.test_proba)


def test_dense_logistic_and_tree_work() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, size=300)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    X[:, 3] += 3.0 * y
    res = fit_logistic(*_split(X, y), Cs=SMALL_CS, n_boot=100)
    assert res.metrics.macro_f1 > 0.9
    assert top_latents(res, top=1)[1][0][0] == 3
    assert fit_tree(*_split(X, y), n_boot=100).metrics.macro_f1 > 0.9


# ---------------------------------------------------------------------------- sparse at scale


def test_65k_wide_fit_never_densifies(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    n, width = 2000, 65_536
    y = rng.integers(0, 2, size=n)
    X = random_csr(rng, n, width, 50)
    X = sp.csr_matrix(X + sp.csr_matrix((y * 2.0, (np.arange(n), np.full(n, 42))), shape=(n, width)))
    parts = _split(X, y)
    forbid_densify(monkeypatch)
    res = fit_logistic(*parts, n_boot=100)
    assert res.metrics.macro_f1 > 0.9
    assert fit_ksparse(*parts, k=5, n_boot=100).selected_features[0] == 42  # type: ignore[index]
    assert fit_tree(*parts, max_depths=(2,), min_samples_leafs=(1,), n_boot=100).metrics.macro_f1 > 0.9


# ---------------------------------------------------------------------------- evaluate


def test_evaluate_against_sklearn_and_bootstrap() -> None:
    rng = np.random.default_rng(8)
    classes = np.array([0, 1, 2])
    y_true = rng.integers(0, 3, size=200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, size=200))
    proba = rng.dirichlet(np.ones(3), size=200)
    m = evaluate(y_true, y_pred, proba, classes, seed=3, n_boot=500)
    assert m.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m.auroc == pytest.approx(roc_auc_score(y_true, proba, multi_class="ovr", labels=classes))
    assert m.macro_f1_ci_low < m.macro_f1 < m.macro_f1_ci_high
    assert set(m.per_class) == {"0", "1", "2"}
    assert m.per_class["1"]["support"] == int((y_true == 1).sum())
    assert m == evaluate(y_true, y_pred, proba, classes, seed=3, n_boot=500)
    assert m != evaluate(y_true, y_pred, proba, classes, seed=4, n_boot=500)


def test_bootstrap_matches_sklearn_per_resample() -> None:
    rng = np.random.default_rng(9)
    t = rng.integers(0, 4, size=60)
    p = np.where(rng.random(60) < 0.5, t, rng.integers(0, 4, size=60))
    boot = metrics.bootstrap_macro_f1(t, p, 4, n_boot=30, seed=11)
    idx = np.random.default_rng(11).integers(0, 60, size=(30, 60))
    expected = [f1_score(t[i], p[i], average="macro", zero_division=0) for i in idx]
    np.testing.assert_allclose(boot, expected, rtol=1e-12)


def test_evaluate_binary_auroc_and_missing_class() -> None:
    classes = np.array(["neg", "pos"])
    y_true = np.array(["neg", "pos", "pos", "neg", "pos"])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    y_pred = classes[proba.argmax(1)]
    m = evaluate(y_true, y_pred, proba, classes, n_boot=50)
    assert m.auroc == pytest.approx(roc_auc_score(y_true == "pos", proba[:, 1]))
    only_pos = evaluate(y_true[y_true == "pos"], y_pred[y_true == "pos"], proba[y_true == "pos"], classes, n_boot=50)
    assert np.isnan(only_pos.auroc)
    three = np.array([0, 1, 2])
    m3 = evaluate(np.array([0, 1, 1]), np.array([0, 1, 2]), np.full((3, 3), 1 / 3), three, n_boot=50)
    assert np.isnan(m3.auroc)
    assert m3.per_class["2"]["support"] == 0


def test_majority_baseline() -> None:
    y_train = np.array(["a", "b", "b", "c"])
    y_test = np.array(["b", "b", "a", "c"])
    expected = f1_score(y_test, ["b"] * 4, average="macro", zero_division=0)
    assert majority_baseline_f1(y_train, y_test) == pytest.approx(expected)


# ---------------------------------------------------------------------------- skops


def test_skops_round_trip(tmp_path: Path) -> None:
    X, y = _planted(300, seed=10, width=2_000)
    parts = _split(X, y)
    Xte = parts[4]
    for res in (
        fit_logistic(*parts, Cs=SMALL_CS, n_boot=0),
        fit_tree(*parts, max_depths=(3,), n_boot=0),
        fit_ksparse(*parts, k=5, Cs=SMALL_CS, n_boot=0),
    ):
        path = tmp_path / "sub" / f"{res.classifier}.skops"
        save_probe(res.estimator, path)
        loaded = load_probe(path)
        assert type(loaded) is type(res.estimator)
        np.testing.assert_array_equal(loaded.predict(Xte), res.test_pred)  # k-sparse: the selector is a step
        np.testing.assert_array_equal(loaded.predict_proba(Xte), res.test_proba)
    assert sorted(os.listdir(tmp_path / "sub")) == ["ksparse.skops", "logistic.skops", "tree.skops"]


def _custom(x: Any) -> Any:
    return x


def test_load_model_refuses_non_sklearn_types(tmp_path: Path) -> None:
    model = Pipeline([("f", FunctionTransformer(_custom)), ("clf", LogisticRegression())])
    model.fit(np.array([[0.0], [1.0], [0.1], [0.9]]), [0, 1, 0, 1])
    path = tmp_path / "m.skops"
    save_probe(model, path)
    with pytest.raises(ValueError, match=r"^path: .*test_probes"):
        load_probe(path)


def test_probe_checks_and_best_artifacts(tmp_path) -> None:
    """What the probes asset reports: its checks' inputs and the best probe per source's files."""
    import pandas as pd

    from mosaic_dag.evaluation.artifacts import probe_checks, write_best_artifacts

    from mosaic_dag.evaluation.sweeps import PartitionResults, ProbeRun, ProbeSpec

    X, y = _planted(300, seed=11, n_classes=2)
    parts = _split(X, y)
    good = fit_logistic(*parts, Cs=SMALL_CS, n_boot=0)
    spec = ProbeSpec(features="sae", pooling="sum", top_n=None, threshold=None, classifier="logistic", k=None)
    test_ids = [f"t{i}" for i in range(len(parts[5]))]
    results = PartitionResults(table=pd.DataFrame(), runs=[ProbeRun(spec, good, test_ids)], majority_f1=0.33,
                               train_ids=["a", "b"])
    checks = probe_checks(results)
    assert checks.sae_macro_f1 == good.metrics.macro_f1 > checks.majority_macro_f1 == 0.33
    assert (checks.train_test_overlap, checks.distinct_test_sets) == (0, 1)
    # a train id that is also a test id, and a second probe scored on other rows, are both caught
    leaky = PartitionResults(table=pd.DataFrame(), runs=[ProbeRun(spec, good, test_ids),
                                                        ProbeRun(spec, good, test_ids[:-1])], train_ids=["t0"])
    assert probe_checks(leaky).distinct_test_sets == 2
    assert probe_checks(PartitionResults(table=pd.DataFrame(), runs=[ProbeRun(spec, good, test_ids)],
                                         train_ids=["t0"])).train_test_overlap == 1
    frame = pd.DataFrame({"label": parts[5], "label_name": np.where(parts[5] == 1, "pos", "neg"),
                          "split": "test"})
    files = write_best_artifacts(results, frame, tmp_path)
    assert [(p.name, where) for p, where in files] == [("confusion-sae.png", "confusion"), ("best-sae.skops", "models")]
    assert all(p.stat().st_size > 0 for p, _ in files)
