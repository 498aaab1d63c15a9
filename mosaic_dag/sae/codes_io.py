"""One file of sparse codes on disk: CSR codes plus token/text bookkeeping as a plain ``.npz`` (no pickle)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from mosaic_dag.errors import CacheError
from mosaic_dag.sae.spec import SaeCodesError
from mosaic_dag.storage import atomic_path

__all__ = ["CODES_FORMAT_VERSION", "SparseCodes", "read_codes", "write_codes"]

CODES_FORMAT_VERSION = 1


class SparseCodes(NamedTuple):
    """Codes of a dataset: token rows grouped by text via ``offsets``."""

    codes: sp.csr_matrix  # float32 [n_tokens, width] (float16 on disk when lossless)
    offsets: np.ndarray  # int64 [n_texts + 1]; text i owns rows offsets[i]:offsets[i+1]
    real_mask: np.ndarray  # bool [n_tokens]
    rows: np.ndarray  # [n_texts] source row ids of the texts


_CODE_KEYS = ("format_version", "shape", "data", "data_dtype", "indices", "indptr", "offsets", "real_mask", "rows")


def _validate_codes(codes: sp.csr_matrix, offsets: np.ndarray, real_mask: np.ndarray, rows: np.ndarray) -> None:
    n_tokens = codes.shape[0]
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise SaeCodesError(f"offsets must be a 1-D integer array of n_texts+1 entries, got dtype {offsets.dtype} shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise SaeCodesError(f"offsets must start at 0, never decrease and end at n_tokens={n_tokens} (ends at {int(offsets[-1])})")
    if real_mask.shape != (n_tokens,) or real_mask.dtype != np.bool_:
        raise SaeCodesError(f"real_mask must be bool with one entry per token ({n_tokens}), got {real_mask.dtype} {real_mask.shape}")
    if rows.shape != (offsets.size - 1,) or rows.dtype == object:
        raise SaeCodesError(f"rows must be a non-object 1-D array with one entry per text ({offsets.size - 1}), got {rows.dtype} {rows.shape}")


def write_codes(
    path: str | Path,
    codes: sp.spmatrix | sp.sparray,
    offsets: np.ndarray,
    real_mask: np.ndarray,
    rows: np.ndarray,
) -> Path:
    """Write codes + token/text bookkeeping as one ``.npz`` (plain arrays, no pickle), atomically.

    Values are stored as float16 when that is lossless (always, for ``encode_sparse`` output),
    otherwise in their own dtype, so ``read_codes`` returns exactly what was saved.
    """
    csr = sp.csr_matrix(codes)
    if csr.dtype == np.float16:  # scipy cannot work on float16 sparse matrices; widen (exact)
        csr = sp.csr_matrix((csr.data.astype(np.float32), csr.indices, csr.indptr), shape=csr.shape)
    else:
        csr = csr.copy()
    csr.sort_indices()
    data = csr.data
    if data.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            as16 = data.astype(np.float16)
        if np.array_equal(as16.astype(data.dtype), data):
            data = as16
    offsets = np.asarray(offsets)
    real_mask = np.asarray(real_mask)
    rows = np.asarray(rows)
    _validate_codes(csr, offsets, real_mask, rows)
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(
                fh,
                format_version=np.array([CODES_FORMAT_VERSION], dtype=np.int64),
                shape=np.array(csr.shape, dtype=np.int64),
                data=data,
                data_dtype=np.array(str(csr.dtype)),
                indices=csr.indices,
                indptr=csr.indptr,
                offsets=offsets.astype(np.int64, copy=False),
                real_mask=real_mask,
                rows=rows,
            )
            fh.flush()
            os.fsync(fh.fileno())
    return target


def read_codes(path: str | Path) -> SparseCodes:
    """Read what ``write_codes`` wrote; raises ``CacheError`` if the file is unreadable or incomplete."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _CODE_KEYS if k not in z.files]
            if missing:
                raise CacheError(f"codes file {p} lacks {missing}; delete it so it is recomputed")
            version = int(z["format_version"][0])
            if version != CODES_FORMAT_VERSION:
                raise CacheError(f"codes file {p} has format {version}, expected {CODES_FORMAT_VERSION}; delete it so it is recomputed")
            shape = tuple(int(s) for s in z["shape"])
            data = z["data"].astype(str(z["data_dtype"]), copy=False)  # float16 on disk -> saved dtype
            codes = sp.csr_matrix((data, z["indices"], z["indptr"]), shape=shape)
            out = SparseCodes(codes=codes, offsets=z["offsets"], real_mask=z["real_mask"], rows=z["rows"])
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CacheError(f"codes file {p} is unreadable ({type(err).__name__}); delete it so it is recomputed") from err
    return out
