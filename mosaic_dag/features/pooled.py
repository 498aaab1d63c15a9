"""Pooled feature matrices per dataset partition: SAE codes (CSR, never densified) and hidden states.

One file per (features, pooling[, top_n]), rows in dataset order:

    <data_dir>/pooled/<model>/L<layer>/<sae>/<dataset>.<language>/<key>/sae-<pooling>.npz
    <data_dir>/pooled/<model>/L<layer>/hidden/<dataset>.<language>/<key>/hidden-<pooling>.npz

Binarization is applied at probe time (it is a cheap, lossless view of the pooled matrix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mosaic_dag.sae.codes import CodesStore
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.handles import CodesHandle, DatasetHandle, HiddenHandle, PooledHandle, UpstreamMissing
from mosaic_dag.paths import pooled_dir
from mosaic_dag.keys import TargetKey
from mosaic_dag.lm.hidden_states import hidden_cache
from mosaic_dag.features.pooling import DENSE_POOLINGS, pool_dense, pool_sparse
from mosaic_dag.storage import atomic_dir, atomic_path


def feature_name(features: str, pooling: str, top_n: int | None) -> str:
    """The name of one pooled matrix: ``<features>-<pooling>[-n<top_n>]`` (features: sae | hidden)."""
    return f"{features}-{pooling}" + (f"-n{top_n}" if pooling == "topn_count" else "")


def write_csr(path: Path, X: sp.csr_matrix) -> None:
    """CSR as plain arrays in an .npz (no pickle), atomically."""
    X = sp.csr_matrix(X)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, data=X.data.astype(np.float32), indices=X.indices.astype(np.int32),
                     indptr=X.indptr.astype(np.int64), shape=np.asarray(X.shape, dtype=np.int64))


def read_matrix(path: Path) -> sp.csr_matrix | np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if "dense" in z:
            return z["dense"]
        return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))


def write_dense(path: Path, X: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, dense=np.asarray(X, dtype=np.float32))


def _reorder(parts: list[tuple[np.ndarray, sp.csr_matrix | np.ndarray]], n: int) -> sp.csr_matrix | np.ndarray:
    """Stack per-shard pooled rows and put them back in dataset order."""
    rows = np.concatenate([r for r, _ in parts])
    if sorted(rows.tolist()) != list(range(n)):
        raise ValueError(f"pooled rows do not cover the dataset (got {len(rows)} of {n}); delete the cache to recompute")
    order = np.argsort(rows, kind="stable")
    mats = [m for _, m in parts]
    if sp.issparse(mats[0]):
        return sp.csr_matrix(sp.vstack(mats, format="csr")[order])
    return np.concatenate(mats)[order]


@dataclass
class PooledResult:
    sae_dir: Path
    hidden_dir: Path
    files: dict[str, Path]
    cache_hit: bool
    width: int
    signed: bool
    neuronpedia_id: str | None
    data: DatasetHandle | None = None

    @property
    def handle(self) -> PooledHandle:
        from dataclasses import asdict

        return PooledHandle(sae_dir=str(self.sae_dir), hidden_dir=str(self.hidden_dir),
                            files={k: str(v) for k, v in self.files.items()}, width=self.width, signed=self.signed,
                            neuronpedia_id=self.neuronpedia_id, dataset=asdict(self.data) if self.data else {})

    @classmethod
    def of(cls, handle: PooledHandle) -> "PooledResult":
        """The pooled matrices behind a handle (checked to still be on disk)."""
        if not handle.exists():
            raise UpstreamMissing(f"pooled_features for {handle.data.key!r}: {handle.sae_dir} is gone; "
                                  "re-materialize pooled_features")
        return cls(Path(handle.sae_dir), Path(handle.hidden_dir), {k: Path(v) for k, v in handle.files.items()},
                   True, handle.width, handle.signed, handle.neuronpedia_id, handle.data)


def _poolings(cfg: ExperimentConfig) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for pooling in cfg.classification.poolings:
        if pooling == "topn_count":
            out += [(pooling, n) for n in cfg.classification.top_n]
        else:
            out.append((pooling, None))
    return out


def build_pooled(cfg: ExperimentConfig, target: TargetKey, codes_handle: CodesHandle,
                 hidden_handle: HiddenHandle) -> PooledResult:
    """Pool SAE codes and hidden states over real tokens only, for every configured pooling."""
    hidden = hidden_cache(hidden_handle, target.model, target.layer)
    codes = CodesStore(Path(codes_handle.path))
    if not codes.is_valid():
        raise UpstreamMissing(f"sae_codes at {codes.path} are missing or incomplete; re-materialize sae_codes")
    man = codes.manifest()
    data = hidden_handle.data
    dataset, _, language = data.key.partition(".")
    poolings = _poolings(cfg)
    n = int(hidden.manifest()["texts"])
    part = f"{dataset}.{language}"
    sae_out = pooled_dir(cfg, target, target.sae, part, {"codes": codes.path.name, "p": poolings})
    hid_pool = [(p, None) for p, _ in poolings if p in DENSE_POOLINGS]
    hid_out = pooled_dir(cfg, target, "hidden", part, {"hidden": hidden.path.name, "p": hid_pool})
    files = {feature_name("sae", p, k): sae_out / f"{feature_name('sae', p, k)}.npz" for p, k in poolings}
    files |= {feature_name("hidden", p, None): hid_out / f"{feature_name('hidden', p, None)}.npz" for p, _ in hid_pool}
    if all(f.exists() for f in files.values()):
        return PooledResult(sae_out, hid_out, files, True, int(man["width"]), bool(man["signed"]),
                            man.get("neuronpedia_id"), data)
    signed = bool(man["signed"])
    if not all(files[feature_name("sae", p, k)].exists() for p, k in poolings):
        acc: dict[str, list] = {feature_name("sae", p, k): [] for p, k in poolings}
        for shard in CodesStore(codes.path).iter_shards():
            for p, k in poolings:
                pooled = pool_sparse(shard.codes, shard.offsets, shard.real_mask, p, top_n=k, signed=signed)
                acc[feature_name("sae", p, k)].append((shard.rows, pooled))
        with atomic_dir(sae_out) as tmp:
            for name, parts in acc.items():
                write_csr(tmp / f"{name}.npz", _reorder(parts, n))
            (tmp / "meta.json").write_text(json.dumps({"codes": str(codes.path), "poolings": poolings}))
    if not all(files[feature_name("hidden", p, None)].exists() for p, _ in hid_pool):
        acc_h: dict[str, list] = {feature_name("hidden", p, None): [] for p, _ in hid_pool}
        for shard in HiddenCache(hidden.path).iter_shards():
            for p, _ in hid_pool:
                acc_h[feature_name("hidden", p, None)].append(
                    (shard.rows, pool_dense(shard.acts, shard.offsets, shard.real_mask, p)))
        with atomic_dir(hid_out) as tmp:
            for name, parts in acc_h.items():
                write_dense(tmp / f"{name}.npz", _reorder(parts, n))
            (tmp / "meta.json").write_text(json.dumps({"hidden": str(hidden.path), "poolings": hid_pool}))
    return PooledResult(sae_out, hid_out, files, False, int(man["width"]), signed, man.get("neuronpedia_id"), data)
