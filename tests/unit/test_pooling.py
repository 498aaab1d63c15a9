"""Pooling: masked tokens never count, vectorised results match naive loops."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp

from mosaic_dag.features.pooling import POOLINGS, binarize, pool_dense, pool_sparse
from tests.support.sparse import forbid_densify, random_csr

HUGE = 1e6

# 5 texts: [BOS a b PAD] | [BOS c] | [BOS] | [a b c] | (empty)
OFFSETS = np.array([0, 4, 6, 7, 10, 10], dtype=np.int64)
MASK = np.array([False, True, True, False, False, True, False, True, True, True])
WIDTH = 6


def _hand_codes() -> np.ndarray:
    dense = np.zeros((10, WIDTH), dtype=np.float32)
    bos_rows = [0, 4, 6]
    dense[bos_rows, :] = HUGE  # BOS lights up everything with a huge value
    dense[3, :] = HUGE  # so does the trailing padding token
    dense[1] = [0, 1.0, 0, 3.0, 0, 0]
    dense[2] = [2.0, 0, 0, 1.0, 0, 0.5]
    dense[5] = [0, 0, 4.0, 0, 0, 0]
    dense[7] = [1.0, 0, 0, 0, 2.0, 0]
    dense[8] = [0, 5.0, 0, 0, 1.0, 0]
    dense[9] = [3.0, 0, 0, 0, 0, 0]
    return dense


def _naive(dense: np.ndarray, offsets: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    out = np.zeros((offsets.size - 1, dense.shape[1]), dtype=np.float64)
    for i in range(offsets.size - 1):
        rows = [r for r in range(offsets[i], offsets[i + 1]) if mask[r]]
        if not rows:
            continue
        block = dense[rows].astype(np.float64)
        if pooling == "sum":
            out[i] = block.sum(0)
        elif pooling == "mean":
            out[i] = block.mean(0)
        elif pooling == "max":
            out[i] = block.max(0)
        elif pooling == "last":
            out[i] = block[-1]
    return out


def _naive_topn(dense: np.ndarray, offsets: np.ndarray, mask: np.ndarray, n: int, signed: bool) -> np.ndarray:
    out = np.zeros((offsets.size - 1, dense.shape[1]), dtype=np.float64)
    for i in range(offsets.size - 1):
        for r in range(offsets[i], offsets[i + 1]):
            if not mask[r]:
                continue
            active = [j for j in range(dense.shape[1]) if dense[r, j] != 0]
            key = (lambda j: (-abs(dense[r, j]), j)) if signed else (lambda j: (-dense[r, j], j))
            for j in sorted(active, key=key)[:n]:
                out[i, j] += 1
    return out


def _random_case(seed: int, signed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, size=25)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    mask = rng.random(n_tokens) > 0.25
    dense = np.where(rng.random((n_tokens, 40)) < 0.2, rng.random((n_tokens, 40)) + 0.1, 0.0)
    if signed:
        dense *= rng.choice([-1.0, 1.0], size=dense.shape)
    dense[~mask] = HUGE
    return dense.astype(np.float32), offsets, mask


@pytest.mark.parametrize("pooling", ["sum", "mean", "max", "last"])
def test_hand_made_matches_naive_and_ignores_masked(pooling: str) -> None:
    dense = _hand_codes()
    expected = _naive(dense, OFFSETS, MASK, pooling)
    got_sparse = pool_sparse(sp.csr_matrix(dense), OFFSETS, MASK, pooling)
    got_dense = pool_dense(dense, OFFSETS, MASK, pooling)
    assert sp.issparse(got_sparse) and got_sparse.format == "csr"
    assert got_sparse.dtype == np.float32 and got_dense.dtype == np.float32
    assert got_sparse.shape == (5, WIDTH)
    np.testing.assert_allclose(got_sparse.toarray(), expected, rtol=1e-6)
    np.testing.assert_allclose(got_dense, expected, rtol=1e-6)
    assert got_sparse.max() < 100 and got_dense.max() < 100  # BOS/PAD value never leaks
    # text 2 is only a BOS, text 4 is empty
    assert got_sparse[[2, 4]].nnz == 0
    assert not got_dense[[2, 4]].any()


def test_hand_made_values() -> None:
    dense = _hand_codes()
    codes = sp.csr_matrix(dense)
    last = pool_sparse(codes, OFFSETS, MASK, "last").toarray()
    # text 0 ends with a masked PAD, so "last" is token 2
    np.testing.assert_array_equal(last[0], dense[2])
    np.testing.assert_array_equal(last[3], dense[9])
    mean = pool_sparse(codes, OFFSETS, MASK, "mean").toarray()
    np.testing.assert_allclose(mean[0], (dense[1] + dense[2]) / 2)  # denominator = 2 real tokens
    np.testing.assert_allclose(mean[1], dense[5])
    summed = pool_sparse(codes, OFFSETS, MASK, "sum").toarray()
    np.testing.assert_allclose(summed[3], dense[7] + dense[8] + dense[9])


def test_topn_count_hand_made() -> None:
    dense = _hand_codes()
    got = pool_sparse(sp.csr_matrix(dense), OFFSETS, MASK, "topn_count", top_n=1).toarray()
    expected = np.zeros((5, WIDTH))
    expected[0, 3] = 1  # token 1: latent 3 (3.0)
    expected[0, 0] = 1  # token 2: latent 0 (2.0)
    expected[1, 2] = 1
    expected[3, 4] = 1  # token 7: latent 4 (2.0)
    expected[3, 1] = 1  # token 8: latent 1 (5.0)
    expected[3, 0] = 1  # token 9: latent 0 (3.0)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("top_n", [1, 3, 50])
def test_topn_count_matches_naive(signed: bool, top_n: int) -> None:
    dense, offsets, mask = _random_case(7, signed)
    got = pool_sparse(sp.csr_matrix(dense), offsets, mask, "topn_count", top_n=top_n, signed=signed)
    assert sp.issparse(got)
    np.testing.assert_array_equal(got.toarray(), _naive_topn(dense, offsets, mask, top_n, signed))
    # each real token contributes min(top_n, n_active) counts
    n_active = (dense[mask] != 0).sum(1)
    assert got.sum() == np.minimum(n_active, top_n).sum()


def test_topn_count_ignores_explicit_zeros() -> None:
    codes = sp.csr_matrix((np.array([0.0, 0.0, 1.0], dtype=np.float32), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 4))
    got = pool_sparse(codes, np.array([0, 1]), np.array([True]), "topn_count", top_n=3).toarray()
    np.testing.assert_array_equal(got, [[0, 0, 1, 0]])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("pooling", ["sum", "mean", "max", "last"])
def test_sparse_and_dense_agree_random(pooling: str, signed: bool) -> None:
    dense, offsets, mask = _random_case(3, signed)
    s = pool_sparse(sp.csr_matrix(dense), offsets, mask, pooling)
    d = pool_dense(dense, offsets, mask, pooling)
    naive = _naive(dense, offsets, mask, pooling)
    np.testing.assert_allclose(s.toarray(), naive, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d, naive, rtol=1e-5, atol=1e-6)
    assert np.abs(d).max() < 100


def test_max_counts_implicit_zeros_for_negative_codes() -> None:
    # latent 0 is negative on both tokens; latent 1 is negative on one token and off on the other
    dense = np.array([[-2.0, -1.0], [-3.0, 0.0]], dtype=np.float32)
    got = pool_sparse(sp.csr_matrix(dense), np.array([0, 2]), np.array([True, True]), "max").toarray()
    np.testing.assert_array_equal(got, [[-2.0, 0.0]])


def test_float16_acts_and_float64_codes_give_float32() -> None:
    # scipy.sparse has no float16, so half-precision only reaches us as dense acts.
    dense, offsets, mask = _random_case(11, False)
    dense[~mask] = 1000.0  # finite in float16
    half = dense.astype(np.float16)
    d = pool_dense(half, offsets, mask, "sum")
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, _naive(half.astype(np.float32), offsets, mask, "sum"), rtol=1e-3)
    s = pool_sparse(sp.csr_matrix(dense.astype(np.float64)), offsets, mask, "mean")
    assert s.dtype == np.float32


def test_all_masked_and_empty_inputs() -> None:
    codes = sp.csr_matrix(np.full((3, 4), HUGE, dtype=np.float32))
    offsets = np.array([0, 3, 3])
    mask = np.zeros(3, dtype=bool)
    for pooling in POOLINGS:
        got = pool_sparse(codes, offsets, mask, pooling, top_n=2)
        assert got.shape == (2, 4) and got.nnz == 0
    for pooling in ("sum", "mean", "max", "last"):
        assert not pool_dense(codes.toarray(), offsets, mask, pooling).any()


def test_errors_name_the_field() -> None:
    codes = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    offsets, mask = np.array([0, 2]), np.ones(2, dtype=bool)
    with pytest.raises(ValueError, match=r"^pooling: .*sum, mean, max, last, topn_count"):
        pool_sparse(codes, offsets, mask, "median")
    with pytest.raises(ValueError, match=r"^pooling: .*topn_count"):
        pool_dense(np.ones((2, 3)), offsets, mask, "topn_count")
    with pytest.raises(ValueError, match=r"^top_n"):
        pool_sparse(codes, offsets, mask, "topn_count")
    with pytest.raises(ValueError, match=r"^offsets"):
        pool_sparse(codes, np.array([0, 1]), mask, "sum")
    with pytest.raises(ValueError, match=r"^real_mask"):
        pool_sparse(codes, offsets, np.ones(3, dtype=bool), "sum")


def test_pool_sparse_never_densifies(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    codes = random_csr(rng, 3000, 65536, 40)
    lengths = np.full(100, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = rng.random(3000) > 0.1
    forbid_densify(monkeypatch)
    for pooling in POOLINGS:
        out = pool_sparse(codes, offsets, mask, pooling, top_n=4)
        assert sp.issparse(out) and out.shape == (100, 65536)


# ---------------------------------------------------------------------------- binarize


def test_binarize_dense_and_sparse() -> None:
    X = np.array([[0.0, 0.5, 1.0, 2.0, -3.0]], dtype=np.float32)
    assert binarize(X, None) is X
    S = sp.csr_matrix(X)
    assert binarize(S, None) is S
    cases = [
        (0.0, False, [0, 1, 1, 1, 0]),
        (1.0, False, [0, 0, 0, 1, 0]),
        (1.0, True, [0, 0, 0, 1, 1]),
        (0.0, True, [0, 1, 1, 1, 1]),
    ]
    for t, signed, expected in cases:
        d = binarize(X, t, signed=signed)
        s = binarize(S, t, signed=signed)
        assert isinstance(d, np.ndarray) and d.dtype == np.float32
        np.testing.assert_array_equal(d, [expected])
        assert sp.issparse(s) and s.format == "csr" and s.dtype == np.float32
        np.testing.assert_array_equal(s.toarray(), [expected])
        assert s.nnz == sum(expected)  # no stored zeros
    np.testing.assert_array_equal(S.toarray(), X)  # input untouched
    with pytest.raises(ValueError, match=r"^threshold"):
        binarize(S, -0.5)
