"""The codes step: encode a dataset partition's hidden states with a target's SAE, stored sparse by shard.

Takes its inputs as handles (mosaic_dag.handles) and never rebuilds them.

    <data_dir>/codes/<model>/L<layer>/<sae>/<key>/         shard-*.npz (CSR) + manifest.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.handles import CodesHandle, HiddenHandle, SaeHandle, UpstreamMissing
from mosaic_dag.keys import TargetKey
from mosaic_dag.paths import codes_dir
from mosaic_dag.lm.hidden_states import hidden_cache
from mosaic_dag.sae.codes_io import read_codes, write_codes
from mosaic_dag.sae.compat import sae_info
from mosaic_dag.sae.encode import encode_sparse
from mosaic_dag.sae.integrity import check_reconstruction, discard_if_corrupt
from mosaic_dag.sae.resolve import SaeCache, check_target, load_target_sae, registry_hint
from mosaic_dag.sae.stats import encode_stats
from mosaic_dag.storage import atomic_dir


@dataclass
class CodesResult:
    path: Path
    cache_hit: bool
    manifest: dict[str, Any]
    handle: CodesHandle


class CodesStore:
    """A folder of per-shard sparse codes written by ``build_codes``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    def is_valid(self) -> bool:
        try:
            man = self.manifest()
        except (OSError, json.JSONDecodeError):
            return False
        return all((self.path / s["file"]).exists() and (self.path / s["file"]).stat().st_size == s["bytes"]
                   for s in man["shards"])

    def iter_shards(self) -> Any:
        for s in self.manifest()["shards"]:
            yield read_codes(self.path / s["file"])


def build_codes(
    cfg: ExperimentConfig, target: TargetKey, sae_handle: SaeHandle, hidden_handle: HiddenHandle,
    progress: Callable[[int, int], None] | None = None, saes: SaeCache | None = None,
) -> CodesResult:
    """Encode one dataset partition's cached hidden states, shard by shard, into sparse codes
    (``saes``: where the loaded SAE is held)."""
    hidden = hidden_cache(hidden_handle, target.model, target.layer)
    hman = hidden.manifest()
    data = hidden_handle.data
    dataset, _, language = data.key.partition(".")
    if sae_handle.origin == "train" and sae_handle.path and discard_if_corrupt(Path(sae_handle.path)):
        if saes is not None:
            saes.forget(sae_handle.path)
        raise UpstreamMissing(f"sae {target.key!r}: the trained SAE at {sae_handle.path} failed its checksums and "
                              "was removed; re-materialize the 'sae' asset for it")
    check_target(cfg, target, hman["hf_name"], hman["d_model"], handle=sae_handle, saes=saes)
    out = CodesStore(codes_dir(cfg, target, hidden.path.name, sae_handle.identity))
    if out.is_valid():
        return CodesResult(out.path, True, out.manifest(), _codes_handle(out.path, hidden_handle, sae_handle))
    sae = load_target_sae(cfg, target, sae_handle, saes)
    info = sae_info(sae, hint=registry_hint(cfg, target))
    width = int(info.width)
    active = np.zeros(width, dtype=bool)
    real_tokens = 0
    l0_sum = 0.0
    ev_weighted = 0.0
    shards = []
    t0 = time.perf_counter()
    n_shards = len(hman["shards"])
    with atomic_dir(out.path) as tmp:
        for i, shard in enumerate(hidden.iter_shards()):
            codes = encode_sparse(sae, shard.acts, real_mask=shard.real_mask)
            stats = encode_stats(sae, shard.acts, codes=codes, real_mask=shard.real_mask)
            check_reconstruction(target.sae, codes, stats)  # corrupt or mismatched weights: stop, name the SAE
            n_real = int(shard.real_mask.sum())
            real_rows = codes[np.flatnonzero(shard.real_mask)]
            active[np.unique(real_rows.indices)] = True
            l0_sum += float(np.diff(real_rows.indptr).sum())
            ev_weighted += stats.explained_variance * n_real
            real_tokens += n_real
            name = f"shard-{i:05d}.npz"
            write_codes(tmp / name, codes, shard.offsets, shard.real_mask, shard.rows)
            shards.append({"file": name, "bytes": (tmp / name).stat().st_size, "tokens": int(codes.shape[0]),
                           "nnz": int(codes.nnz)})
            if progress:
                progress(i + 1, n_shards)
        manifest = {
            "model": target.model, "layer": target.layer, "sae": target.sae, "sae_identity": sae_handle.identity,
            "width": width, "architecture": info.architecture, "signed": bool(info.signed),
            "neuronpedia_id": info.neuronpedia_id, "dataset": dataset, "language": language,
            "hidden_cache": str(hidden.path), "tokens": int(hman["tokens"]), "real_tokens": real_tokens,
            "mean_l0": l0_sum / max(1, real_tokens), "dead_fraction": float(1 - active.mean()),
            "explained_variance": ev_weighted / max(1, real_tokens),
            "bytes": sum(s["bytes"] for s in shards), "dense_fp16_bytes": int(hman["tokens"]) * width * 2,
            "seconds": time.perf_counter() - t0, "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return CodesResult(out.path, False, manifest, _codes_handle(out.path, hidden_handle, sae_handle))


def _codes_handle(path: Path, hidden: HiddenHandle, sae: SaeHandle) -> CodesHandle:
    return CodesHandle(path=str(path), hidden=asdict(hidden), sae=asdict(sae))

