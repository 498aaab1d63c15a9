"""Token -> text pooling of SAE codes (sparse) and hidden states (dense).

Layout: texts are concatenated along the token axis; text ``i`` owns rows
``offsets[i]:offsets[i+1]``. ``real_mask`` marks real tokens; masked tokens
(BOS, padding, other specials) never contribute to any pooling, and a text
with no real tokens pools to an all-zero row.

Everything is vectorised with sparse "segment" matrices so that neither a
tokens x width nor a texts x width matrix is ever densified.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from mosaic_dag.config import DENSE_POOLINGS, POOLINGS

__all__ = [
    "DENSE_POOLINGS",
    "POOLINGS",
    "binarize",
    "pool_dense",
    "pool_sparse",
]


def _check_pooling(pooling: str, allowed: tuple[str, ...]) -> None:
    if pooling not in allowed:
        raise ValueError(f"pooling: unknown value {pooling!r}; allowed values: {', '.join(allowed)}")


def _check_layout(
    offsets: npt.ArrayLike, real_mask: npt.ArrayLike, n_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    off = np.asarray(offsets, dtype=np.int64)
    mask = np.asarray(real_mask)
    if off.ndim != 1 or off.size < 1:
        raise ValueError("offsets: must be a 1-D array of length n_texts + 1")
    if off[0] != 0 or off[-1] != n_tokens:
        raise ValueError(f"offsets: must start at 0 and end at n_tokens={n_tokens}, got {off[0]}..{off[-1]}")
    if np.any(np.diff(off) < 0):
        raise ValueError("offsets: must be non-decreasing")
    if mask.dtype != np.bool_:
        raise ValueError(f"real_mask: must be a bool array, got dtype {mask.dtype}")
    if mask.shape != (n_tokens,):
        raise ValueError(f"real_mask: expected shape ({n_tokens},), got {mask.shape}")
    return off, mask


def _token_text_ids(offsets: np.ndarray) -> np.ndarray:
    """Text index of every token row."""
    n_texts = offsets.size - 1
    return np.repeat(np.arange(n_texts, dtype=np.int64), np.diff(offsets))


def _segment_matrix(
    offsets: np.ndarray, real_mask: np.ndarray, weights: str = "one"
) -> tuple[sp.csr_array, np.ndarray]:
    """[n_texts, n_tokens] matrix S so that S @ tokens pools over real tokens.

    ``weights``: "one" (sum), "mean" (1/n_real), "last" (1 on last real token only).
    Also returns the number of real tokens per text.
    """
    n_texts = offsets.size - 1
    n_tokens = int(offsets[-1])
    text_of = _token_text_ids(offsets)
    pos = np.flatnonzero(real_mask)
    rows = text_of[pos]
    n_real = np.bincount(rows, minlength=n_texts).astype(np.int64)
    if weights == "one":
        vals = np.ones(pos.size, dtype=np.float32)
    elif weights == "mean":
        vals = (1.0 / n_real[rows]).astype(np.float32)
    elif weights == "last":
        # ``pos`` is sorted, so the last real token of a text is the final entry of its run.
        is_last = np.ones(pos.size, dtype=bool)
        if pos.size > 1:
            is_last[:-1] = rows[1:] != rows[:-1]
        pos, rows = pos[is_last], rows[is_last]
        vals = np.ones(pos.size, dtype=np.float32)
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"weights: unknown value {weights!r}")
    seg = sp.csr_array((vals, (rows, pos)), shape=(n_texts, n_tokens), dtype=np.float32)
    return seg, n_real


def _as_csr32(codes: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    if not sp.issparse(codes):
        raise ValueError(f"codes: must be a scipy.sparse matrix, got {type(codes).__name__}")
    out = sp.csr_matrix(codes, dtype=np.float32, copy=False)
    if not out.has_canonical_format:
        out = out.copy()
        out.sum_duplicates()
    return out


def _finish(mat: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    out = sp.csr_matrix(mat, dtype=np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def _sparse_max(codes: sp.csr_matrix, offsets: np.ndarray, real_mask: np.ndarray) -> sp.csr_matrix:
    """Segment max over real tokens, treating implicit entries as zeros."""
    n_texts = offsets.size - 1
    width = codes.shape[1]
    text_of = _token_text_ids(offsets)
    n_real = np.bincount(text_of[real_mask], minlength=n_texts)
    real = codes[np.flatnonzero(real_mask)].tocoo()
    if real.nnz == 0:
        return sp.csr_matrix((n_texts, width), dtype=np.float32)
    t = text_of[np.flatnonzero(real_mask)][real.row]
    key = t * np.int64(width) + real.col.astype(np.int64)
    order = np.argsort(key, kind="stable")
    key_s, value_s = key[order], real.data[order]
    starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    gmax = np.maximum.reduceat(value_s, starts)
    gcount = np.diff(np.r_[starts, key_s.size])
    gkey = key_s[starts]
    g_text = gkey // width
    g_col = gkey % width
    # A latent inactive on some real token of the text has an implicit zero there.
    has_zero = gcount < n_real[g_text]
    gmax = np.where(has_zero, np.maximum(gmax, 0.0), gmax).astype(np.float32)
    return _finish(sp.csr_matrix((gmax, (g_text, g_col)), shape=(n_texts, width)))


def _sparse_topn(
    codes: sp.csr_matrix, offsets: np.ndarray, real_mask: np.ndarray, top_n: int, signed: bool
) -> sp.csr_matrix:
    """Per real token, one-hot of its ``top_n`` largest active latents, summed per text.

    Ties are broken towards the lower latent index (stable sort on CSR order).
    """
    n_texts = offsets.size - 1
    width = codes.shape[1]
    text_of = _token_text_ids(offsets)
    pos = np.flatnonzero(real_mask)
    real = codes[pos]
    real.eliminate_zeros()  # only active latents may enter the top-n
    real.sort_indices()
    nnz_per_row = np.diff(real.indptr)
    row_of_entry = np.repeat(np.arange(real.shape[0], dtype=np.int64), nnz_per_row)
    score = np.abs(real.data) if signed else real.data
    order = np.lexsort((-score.astype(np.float64), row_of_entry))
    rank = np.arange(real.nnz, dtype=np.int64) - real.indptr[row_of_entry[order]]
    keep = order[rank < top_n]
    rows = text_of[pos][row_of_entry[keep]]
    cols = real.indices[keep]
    ones = np.ones(keep.size, dtype=np.float32)
    # COO -> CSR sums duplicate (text, latent) pairs, giving the counts.
    return _finish(sp.coo_matrix((ones, (rows, cols)), shape=(n_texts, width)).tocsr())


def pool_sparse(
    codes: sp.spmatrix | sp.sparray,
    offsets: npt.ArrayLike,
    real_mask: npt.ArrayLike,
    pooling: str,
    top_n: int | None = None,
    signed: bool = False,
) -> sp.csr_matrix:
    """Pool token-level SAE codes [n_tokens, width] to texts -> float32 CSR [n_texts, width].

    ``signed`` only affects ``topn_count`` (rank latents by |value| instead of value).
    ``max`` takes the true maximum, so implicit zeros count when a latent is off on
    some real token.
    """
    _check_pooling(pooling, POOLINGS)
    csr = _as_csr32(codes)
    off, mask = _check_layout(offsets, real_mask, csr.shape[0])
    if pooling == "sum":
        seg, _ = _segment_matrix(off, mask, "one")
        return _finish(seg @ csr)
    if pooling == "mean":
        seg, _ = _segment_matrix(off, mask, "mean")
        return _finish(seg @ csr)
    if pooling == "last":
        seg, _ = _segment_matrix(off, mask, "last")
        return _finish(seg @ csr)
    if pooling == "max":
        return _sparse_max(csr, off, mask)
    # topn_count
    if top_n is None or int(top_n) < 1:
        raise ValueError(f"top_n: must be a positive int for pooling='topn_count', got {top_n!r}")
    return _sparse_topn(csr, off, mask, int(top_n), signed)


def pool_dense(
    acts: npt.ArrayLike,
    offsets: npt.ArrayLike,
    real_mask: npt.ArrayLike,
    pooling: str,
) -> np.ndarray:
    """Pool dense hidden states [n_tokens, d] to texts -> float32 [n_texts, d]."""
    if pooling == "topn_count":
        raise ValueError(
            "pooling: 'topn_count' needs sparse SAE codes and is not defined for dense "
            f"activations; allowed values for dense: {', '.join(DENSE_POOLINGS)}"
        )
    _check_pooling(pooling, DENSE_POOLINGS)
    arr = np.asarray(acts)
    if arr.ndim != 2:
        raise ValueError(f"acts: must be 2-D [n_tokens, d], got shape {arr.shape}")
    off, mask = _check_layout(offsets, real_mask, arr.shape[0])
    n_texts, d = off.size - 1, arr.shape[1]
    if pooling in ("sum", "mean", "last"):
        weights = {"sum": "one", "mean": "mean", "last": "last"}[pooling]
        seg, _ = _segment_matrix(off, mask, weights)
        out = seg @ arr.astype(np.float32, copy=False)
        return np.ascontiguousarray(out, dtype=np.float32)
    # max: masked rows become -inf so they never win; empty texts end up as zeros.
    work = arr.astype(np.float32, copy=True)
    work[~mask] = -np.inf
    out = np.zeros((n_texts, d), dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(off) > 0)
    if nonempty.size:
        out[nonempty] = np.maximum.reduceat(work, off[nonempty], axis=0)
    out[~np.isfinite(out)] = 0.0
    return out


def binarize(
    X: sp.spmatrix | sp.sparray | np.ndarray,
    threshold: float | None,
    signed: bool = False,
) -> sp.spmatrix | sp.sparray | np.ndarray:
    """``X > threshold`` (``|X| > threshold`` if signed) as float32; None returns X as is.

    Sparse input stays CSR; a negative threshold on sparse input is refused because it
    would switch on every implicit zero.
    """
    if threshold is None:
        return X
    t = float(threshold)
    if sp.issparse(X):
        if t < 0:
            raise ValueError(f"threshold: must be >= 0 for sparse input, got {t}")
        out = sp.csr_matrix(X, copy=True)
        vals = np.abs(out.data) if signed else out.data
        out.data = (vals > t).astype(np.float32)
        out = sp.csr_matrix(out, dtype=np.float32)
        out.eliminate_zeros()
        return out
    arr = np.asarray(X)
    vals = np.abs(arr) if signed else arr
    return (vals > t).astype(np.float32)
