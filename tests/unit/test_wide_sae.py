"""Wide SAEs (Gemma Scope 2 goes to 262k and 1M latents): codes come tile by tile, decoding stays sparse.

The width thresholds are lowered here so a 2,000-wide SAE takes the wide path; the codes must equal
sae-lens's own dense ``encode`` on the same tokens, and no [tokens, width] array may be built.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tests.support.sae import make_sae

import mosaic_dag.sae.encode as sae_mod
from mosaic_dag.features.pooling import pool_sparse
from mosaic_dag.probes.ksparse import fit_ksparse
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.sae.encode import encode_sparse
from mosaic_dag.sae.stats import encode_stats

WIDTH = 2000  # not a multiple of the tile: the last tile is narrower


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae_mod, "_WIDE", 1000)
    monkeypatch.setattr(sae_mod, "_TILE_WIDTH", 384)


def _dense_codes(sae: object, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x)).numpy()  # type: ignore[attr-defined]


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_wide_codes_equal_dense_encode(wide: None, architecture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sae = make_sae(architecture, d_in=32, width=WIDTH, seed=1)
    if architecture == "topk":
        sae.cfg.rescale_acts_by_decoder_norm = True  # ranks by pre-activation x decoder norm
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(WIDTH, 1, generator=torch.Generator().manual_seed(2)) + 0.5)
    x = np.random.default_rng(0).standard_normal((70, 32)).astype(np.float32)
    calls: list[tuple[int, ...]] = []
    real_addmm = torch.addmm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_addmm(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    codes = encode_sparse(sae, x)
    monkeypatch.setattr(torch, "addmm", real_addmm)
    assert calls and max(c[1] for c in calls) <= 384  # pre-activations only ever one tile wide
    ref = _dense_codes(sae, x)
    assert codes.shape == (70, WIDTH)
    got = codes.toarray()
    assert np.array_equal(got != 0, ref != 0)
    np.testing.assert_allclose(got, ref.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-5)
    if architecture == "topk":
        assert set(np.diff(codes.indptr)) <= {8}


def test_wide_stats_decode_sparsely(wide: None, monkeypatch: pytest.MonkeyPatch) -> None:
    sae = make_sae("jumprelu", d_in=32, width=WIDTH, seed=3)
    x = np.random.default_rng(1).standard_normal((90, 32)).astype(np.float32)
    codes = encode_sparse(sae, x)
    with torch.no_grad():
        x_hat = sae.decode(torch.from_numpy(codes.toarray())).double().numpy()
    sse = ((x.astype(np.float64) - x_hat) ** 2).sum()
    ev_ref = 1 - sse / ((x - x.mean(0)) ** 2).sum()

    def no_dense(*_: object, **__: object) -> None:
        raise AssertionError("dense codes built")

    monkeypatch.setattr(sp.csr_matrix, "toarray", no_dense)
    stats = encode_stats(sae, x, codes=codes)
    assert stats.explained_variance == pytest.approx(ev_ref, rel=1e-5, abs=1e-6)
    assert stats.mean_l0 == pytest.approx(codes.nnz / 90)


def test_wide_pooled_codes_fit_sparse_probes(wide: None) -> None:
    sae = make_sae("jumprelu", d_in=32, width=WIDTH, seed=4)
    rng = np.random.default_rng(2)
    n_texts, per = 60, 5
    y = np.arange(n_texts) % 2
    x = rng.standard_normal((n_texts * per, 32)).astype(np.float32)
    x += np.repeat(y, per)[:, None] * 1.5 * np.eye(32, dtype=np.float32)[0]  # class signal on one direction
    codes = encode_sparse(sae, x)
    offsets = np.arange(0, n_texts * per + 1, per)
    pooled = pool_sparse(codes, offsets, np.ones(n_texts * per, dtype=bool), "sum")
    assert sp.issparse(pooled) and pooled.shape == (n_texts, WIDTH)
    tr, va, te = slice(0, 36), slice(36, 48), slice(48, 60)
    res = fit_logistic(pooled[tr], y[tr], pooled[va], y[va], pooled[te], y[te], Cs=(0.1, 1.0), n_splits=2, n_boot=20)
    ks = fit_ksparse(pooled[tr], y[tr], pooled[va], y[va], pooled[te], y[te], k=16, Cs=(1.0,), n_splits=2, n_boot=20)
    assert res.estimator.steps[-1][1].coef_.shape[-1] == WIDTH
    assert ks.selected_features is not None and ks.selected_features.size == 16
    assert res.metrics.macro_f1 > 0.5


def _wide_problem(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """240 rows x 3,000 columns, 3 classes; only the first 400 columns ever fire (like a wide SAE on few texts)."""
    rng = np.random.default_rng(seed)
    X = sp.random(240, 400, density=0.05, random_state=seed, format="csr", dtype=np.float64) * 5.0
    y = np.arange(240) % 3
    X = X + sp.csr_matrix((np.eye(3)[y] @ rng.random((3, 400))) * (X.toarray() > 0))  # class signal on active cells
    return sp.hstack([X, sp.csr_matrix((240, 2600))], format="csr"), y


def test_active_column_fit_equals_full_fit() -> None:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MaxAbsScaler

    from mosaic_dag.probes.wide import active_columns, fit_on_active_columns

    X, y = _wide_problem()
    assert active_columns(X).size <= 400 < X.shape[1]
    pipe = Pipeline([("scale", MaxAbsScaler()),
                     ("clf", LogisticRegression(class_weight="balanced", max_iter=5000, tol=1e-10))])
    search = GridSearchCV(pipe, {"clf__C": [0.01, 0.1, 1.0, 10.0]}, scoring="f1_macro",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0))
    full = clone(search).fit(X, y)
    model = fit_on_active_columns(search, X, y)
    assert search.best_params_ == full.best_params_
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], full.cv_results_["mean_test_score"], atol=1e-12)
    ref = full.best_estimator_
    assert model.named_steps["clf"].coef_.shape == ref.named_steps["clf"].coef_.shape == (3, X.shape[1])
    np.testing.assert_allclose(model.named_steps["clf"].coef_, ref.named_steps["clf"].coef_, atol=1e-6)
    np.testing.assert_allclose(model.named_steps["clf"].intercept_, ref.named_steps["clf"].intercept_, atol=1e-6)
    np.testing.assert_allclose(model.named_steps["scale"].scale_, ref.named_steps["scale"].scale_)
    # new rows with values in columns never active in fitting: same answers as the full fit
    rng = np.random.default_rng(5)
    X_new = sp.random(50, X.shape[1], density=0.02, random_state=rng, format="csr") * 5.0
    np.testing.assert_array_equal(model.predict(X_new), ref.predict(X_new))
    np.testing.assert_allclose(model.predict_proba(X_new), ref.predict_proba(X_new), atol=1e-6)


def test_fit_logistic_on_wide_sparse_answers_at_full_width(tmp_path: object) -> None:
    from mosaic_dag.probes.io import load_probe, save_probe

    X, y = _wide_problem(1)
    res = fit_logistic(X[:150], y[:150], X[150:200], y[150:200], X[200:], y[200:], n_boot=10)
    clf = res.estimator.named_steps["clf"]
    assert clf.coef_.shape == (3, X.shape[1]) and res.estimator.n_features_in_ == X.shape[1]
    assert not clf.coef_[:, 400:].any()  # never-active columns carry no weight
    path = save_probe(res.estimator, tmp_path / "p.skops")  # type: ignore[operator]
    np.testing.assert_array_equal(load_probe(path).predict(X[200:]), res.test_pred)
