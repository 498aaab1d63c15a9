"""Section 3: peak RSS of extraction + SAE codes + pooling does not grow with the number of texts.

Each size runs in a fresh subprocess (``python -m bench.memory ...``) that loads the model, runs
``extract_to_cache`` into a temporary folder, then streams ``HiddenCache.iter_shards()`` through
``encode_sparse`` and ``pool_sparse`` (sum), keeping only the pooled sparse rows; it reports its own
peak RSS. Peak RSS is read from /proc/self/status VmHWM, reset right after the model and SAE are
loaded and fully paged in (its weights are memory-mapped), so the number is "resident model +
everything extraction, codes and pooling needed";
``ru_maxrss`` is reported too but is not used: on Linux it is inherited across ``execve`` from the
parent (see ``bench.common.peak_rss_mib``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, current_rss_mib, peak_rss_mib, reset_peak_rss


def child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from mosaic_dag.config import ModelConfig
    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache
    from mosaic_dag.lm.models import load_model
    from mosaic_dag.features.pooling import pool_sparse
    from mosaic_dag.sae.encode import encode_sparse
    from mosaic_dag.sae.loading import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts).read_text())[: args.n]
    root = Path(os.environ.get("MOSAIC_CACHE") or Path.home() / ".cache" / "mosaic") / "models"
    loaded = load_model(ModelConfig(name="m", id=args.model_id, layers=[args.layer], dtype=args.dtype, device="cpu"), root)
    sae = load_sae(path=args.sae)
    rss_lazy = current_rss_mib()
    # The weights are memory-mapped from the safetensors snapshot and paged in on first touch, so a
    # run that meets more distinct tokens pages in more of the 262k x 640 embedding table (measured:
    # +0.35 GB between 1k and 8k tweets, file-backed, bounded by the model's size). Page the whole
    # model in first, so the peak below measures what extraction, codes and pooling need.
    with torch.inference_mode():
        for p in loaded.model.parameters():
            p.sum()
    peak_loaded = peak_rss_mib()  # includes the model load's transient
    reset = reset_peak_rss()  # from here on VmHWM = the resident model + what the work needs
    rss_loaded = current_rss_mib()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "cache"
        stats = extract_to_cache(loaded, texts, [args.layer], {args.layer: folder},
                                 max_length=args.max_length, batch_tokens=args.batch_tokens)
        t1 = time.perf_counter()
        pooled, rows, shards = [], [], 0
        for shard in HiddenCache(folder).iter_shards():
            codes = encode_sparse(sae, shard.acts, real_mask=shard.real_mask)
            pooled.append(pool_sparse(codes, shard.offsets, shard.real_mask, "sum"))
            rows.append(shard.rows)
            shards += 1
            del codes, shard
        X = sp.csr_matrix(sp.vstack(pooled, format="csr"))
        X = X[np.argsort(np.concatenate(rows))]
    t2 = time.perf_counter()
    return {
        "texts": len(texts), "tokens": stats.tokens, "shards": shards, "pooled_shape": list(X.shape),
        "pooled_nnz": int(X.nnz), "pooled_mib": (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20,
        "extract_s": t1 - t0, "codes_pool_s": t2 - t1,
        "rss_after_load_lazy_mib": rss_lazy, "rss_after_load_mib": rss_loaded, "peak_rss_during_load_mib": peak_loaded, "peak_reset": reset,
        "work_peak_rss_mib": peak_rss_mib(), "process_peak_rss_mib": max(peak_loaded, peak_rss_mib()),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(n: int, *, texts_file: Path, model_id: str, sae_path: Path, layer: int, max_length: int,
            batch_tokens: int, dtype: str = "auto", threads: int | None = None, workdir: Path | None = None,
            timeout: float = 1800) -> dict[str, Any]:
    """Run the child for ``n`` texts in a fresh interpreter and return what it reports."""
    cmd = [sys.executable, "-m", "bench.memory", "--texts", str(texts_file), "--n", str(n), "--model-id", model_id,
           "--sae", str(sae_path), "--layer", str(layer), "--max-length", str(max_length),
           "--batch-tokens", str(batch_tokens), "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    if workdir:
        cmd += ["--workdir", str(workdir)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for n={n} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def run(texts: list[str], sizes: tuple[int, int], *, model_id: str, sae_path: Path, layer: int, max_length: int,
        batch_tokens: int, threads: int | None = None, workdir: Path) -> dict[str, Any]:
    texts_file = Path(workdir) / "memory_texts.json"
    texts_file.write_text(json.dumps(texts[: max(sizes)]))
    small, big = (measure(n, texts_file=texts_file, model_id=model_id, sae_path=sae_path, layer=layer,
                          max_length=max_length, batch_tokens=batch_tokens, threads=threads, workdir=Path(workdir))
                  for n in sizes)
    return {
        "sizes": list(sizes), "layer": layer, "max_length": max_length, "batch_tokens": batch_tokens,
        "small": small, "big": big,
        # The verdict uses the peak after the model load (load transients would hide any growth).
        "ratio": big["work_peak_rss_mib"] / small["work_peak_rss_mib"],
        "process_ratio": big["process_peak_rss_mib"] / small["process_peak_rss_mib"],
        "growth_mib": big["work_peak_rss_mib"] - small["work_peak_rss_mib"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--texts", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--model-id", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--batch-tokens", type=int, required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workdir", default=None)
    print(json.dumps(child(p.parse_args())))


if __name__ == "__main__":
    main()
