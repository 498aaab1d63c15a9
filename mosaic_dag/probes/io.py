"""Fitted probes on disk with skops (no pickle): written atomically, read back trusting only known types."""

from __future__ import annotations

import os
from pathlib import Path

import skops.io as sio
from sklearn.base import BaseEstimator

from mosaic_dag.storage import atomic_path

__all__ = ["load_probe", "save_probe"]

_TRUSTED_ROOTS: tuple[str, ...] = ("sklearn", "numpy")
# mosaic's own estimator classes a saved probe may hold (the k-sparse probe's selector)
_TRUSTED_TYPES: frozenset[str] = frozenset({"mosaic_dag.probes.ksparse.ClassMeanSelector"})


def save_probe(estimator: BaseEstimator, path: str | os.PathLike[str]) -> Path:
    """Write ``estimator`` with skops, atomically (mosaic_dag.storage.atomic_path)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        sio.dump(estimator, tmp)
    return target


def load_probe(path: str | os.PathLike[str]) -> BaseEstimator:
    """Load a skops file, trusting only sklearn/numpy types and mosaic's own probe classes (refuses anything else)."""
    untrusted = sio.get_untrusted_types(file=path)
    bad = [t for t in untrusted if t.split(".", 1)[0] not in _TRUSTED_ROOTS and t not in _TRUSTED_TYPES]
    if bad:
        raise ValueError(f"path: {path} contains types outside sklearn/numpy: {', '.join(bad)}")
    return sio.load(path, trusted=list(untrusted))
