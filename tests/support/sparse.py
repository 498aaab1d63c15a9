"""Helpers shared by the sparse pooling and probe tests."""

from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp


def random_csr(rng: np.random.Generator, n: int, width: int, nnz_per_row: int) -> sp.csr_matrix:
    """Fast random CSR (sp.random is slow at this width)."""
    rows = np.repeat(np.arange(n), nnz_per_row)
    cols = rng.integers(0, width, size=n * nnz_per_row)
    vals = rng.random(n * nnz_per_row).astype(np.float32) + 0.01
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, width))


def forbid_densify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make densifying any rows x width sparse matrix raise.

    Vectors and few-row matrices (per-feature max for MaxAbsScaler) are still allowed.
    """
    originals: dict[tuple[type, str], Any] = {}

    def guarded(attr: str, klass: type) -> Any:
        def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
            if min(self.shape) >= 50:
                raise AssertionError(f"sparse {self.shape} matrix was densified")
            return originals[(klass, attr)](self, *a, **kw)

        return wrapper

    classes = [sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.csr_array, sp.csc_array, sp.coo_array]
    for cls in classes:
        for klass in cls.__mro__:
            for attr in ("toarray", "todense"):
                if attr in vars(klass) and (klass, attr) not in originals:
                    originals[(klass, attr)] = vars(klass)[attr]
                    monkeypatch.setattr(klass, attr, guarded(attr, klass))
    with pytest.raises(AssertionError):
        sp.csr_matrix((60, 60)).toarray()
    with pytest.raises(AssertionError):
        sp.csr_matrix((60, 60)).tocsc().todense()
    assert sp.csr_matrix((1, 60)).toarray().shape == (1, 60)
