"""Hard conditions: exact sizes, stratification, exact noise, test rows untouched."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from mosaic_dag.evaluation import conditions
from mosaic_dag.evaluation.conditions import (
    CURVE_COLUMNS,
    condition_curves,
    imbalance,
    label_noise,
    subsample_train,
)
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.tree import fit_tree


def _y(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(y)


@pytest.mark.parametrize("n", [3, 10, 37, 100, 299])
def test_subsample_sizes_are_exact_and_stratified(n: int) -> None:
    y = _y({0: 200, 1: 90, 2: 10})
    idx = subsample_train(y, n, seed=1)
    assert idx.size == n and np.unique(idx).size == n and np.all(np.diff(idx) > 0)
    got = np.bincount(y[idx], minlength=3)
    assert got.min() >= 1  # every class kept once n >= n_classes
    expected = np.array([200, 90, 10]) / 300 * n
    assert np.abs(got - expected).max() <= 1.5  # proportional up to rounding and the 1-per-class floor
    np.testing.assert_array_equal(idx, subsample_train(y, n, seed=1))  # seeded
    assert not np.array_equal(idx, subsample_train(y, n, seed=2)) or n == 299


def test_subsample_edge_cases() -> None:
    y = _y({0: 5, 1: 5})
    np.testing.assert_array_equal(subsample_train(y, None), np.arange(10))
    np.testing.assert_array_equal(subsample_train(y, 50), np.arange(10))
    assert subsample_train(y, 1).size == 1
    with pytest.raises(ValueError, match="n: must be"):
        subsample_train(y, 0)


def test_imbalance_binary_and_multiclass() -> None:
    y = _y({0: 100, 1: 100})
    idx = imbalance(y, 0.1, seed=0)
    kept = np.bincount(y[idx])
    assert kept[0] == 100 and kept[1] == 11  # round(0.1 / 0.9 * 100): the positive class is cut
    assert kept[1] / kept.sum() == pytest.approx(0.1, abs=0.01)
    y2 = _y({0: 30, 1: 200})  # the minority (0) is cut, the majority kept whole
    k2 = np.bincount(y2[imbalance(y2, 0.05, seed=0)])
    assert k2[1] == 200 and k2[0] == 11
    y3 = _y({0: 50, 1: 120, 2: 8})
    k3 = np.bincount(y3[imbalance(y3, 0.2, seed=0)])
    assert k3.tolist() == [30, 120, 8]  # all but the largest cut to round(0.25 * 120); 8 is already below
    with pytest.raises(ValueError, match="minority_fraction"):
        imbalance(y, 0.0)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.333, 1.0])
def test_label_noise_flips_exactly_round_rate_n(rate: float) -> None:
    y = _y({0: 40, 1: 37, 2: 20})
    noisy = label_noise(y, rate, seed=3)
    assert int((noisy != y).sum()) == round(rate * y.size)
    assert set(np.unique(noisy)) <= {0, 1, 2}
    assert noisy is not y and np.array_equal(y, _y({0: 40, 1: 37, 2: 20}))  # input untouched
    np.testing.assert_array_equal(noisy, label_noise(y, rate, seed=3))


def test_label_noise_with_string_labels() -> None:
    y = np.array(["a", "b"] * 10)
    noisy = label_noise(y, 0.5, seed=0)
    assert (noisy != y).sum() == 10 and set(noisy) == {"a", "b"}


def _data(seed: int = 0, n: int = 400, width: int = 6) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width))
    y = (X[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int)
    a, b = int(0.6 * n), int(0.75 * n)
    return X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:]


def test_condition_curves_shape_and_test_rows_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    Xtr, ytr, Xva, yva, Xte, yte = _data()
    Xte_copy, yte_copy = Xte.copy(), yte.copy()
    seen: list[tuple[int, int, int]] = []
    base = functools.partial(fit_logistic, Cs=(1.0,), n_splits=2)

    def spy(Xa: Any, ya: Any, Xb: Any, yb: Any, Xc: Any, yc: Any, **kw: Any) -> Any:
        assert Xc is Xte and yc is yte or (np.array_equal(Xc, Xte_copy) and np.array_equal(yc, yte_copy))
        seen.append((len(ya), len(yb), len(yc)))
        return base(Xa, ya, Xb, yb, Xc, yc, **kw)

    df = condition_curves(
        Xtr, ytr, Xva, yva, Xte, yte, sizes=(16, 64, None), imbalances=(0.5, 0.1), noise_rates=(0.0, 0.2, 0.45),
        fit=spy, seed=0, n_boot=20,
    )
    assert list(df.columns) == list(CURVE_COLUMNS)
    assert len(df) == 3 + 2 + 3 and len(seen) == len(df)
    assert df["condition"].tolist() == ["size"] * 3 + ["imbalance"] * 2 + ["noise"] * 3
    np.testing.assert_array_equal(Xte, Xte_copy)
    np.testing.assert_array_equal(yte, yte_copy)
    assert (df["n_test"] == yte.size).all() and all(c == yte.size for *_, c in seen)
    sizes = df[df.condition == "size"]
    assert sizes["n_train"].tolist() == [16, 64, ytr.size + yva.size]
    assert sizes["value"].tolist() == [16.0, 64.0, float(ytr.size + yva.size)]
    assert seen[0][:2] == (13, 3)  # 16 rows shared 240:60 between train and validation
    full = sizes["macro_f1"].iloc[-1]
    assert full > 0.8 and (df["note"] == "").all()
    noise = df[df.condition == "noise"].set_index("value")["macro_f1"]
    assert noise.loc[0.0] == full  # no noise == the full-data probe
    assert noise.loc[0.45] < noise.loc[0.0]


def test_condition_curves_sparse_and_impossible_points() -> None:
    Xtr, ytr, Xva, yva, Xte, yte = _data(1, n=200)
    tree = functools.partial(fit_tree, max_depths=(2,), min_samples_leafs=(1,))
    df = condition_curves(
        sp.csr_matrix(Xtr), ytr, sp.csr_matrix(Xva), yva, sp.csr_matrix(Xte), yte,
        sizes=(2, None), imbalances=(), noise_rates=(0.1,), fit=tree, seed=0, n_boot=0,
    )
    assert len(df) == 3
    bad = df.iloc[0]  # 2 rows: 2 in train, none left for validation -> fit_tree cannot select
    assert np.isnan(bad["macro_f1"]) and bad["note"] and "\n" not in bad["note"]
    assert df["macro_f1"].iloc[1:].notna().all()


def test_module_exports_exactly_its_public_functions() -> None:
    import inspect

    public = {n for n, f in inspect.getmembers(conditions, inspect.isfunction)
              if not n.startswith("_") and f.__module__ == conditions.__name__}
    assert set(conditions.__all__) - {"CURVE_COLUMNS"} == public
    assert list(conditions.CURVE_COLUMNS)  # the exported schema of the curves table
    assert {"subsample_train", "imbalance", "label_noise", "condition_curves"} <= public
