"""Section 4: ``fit_logistic`` on sparse pooled SAE features (16k and 65k wide) vs the same data dense.

The 5,000-row feature matrices are synthetic but shaped like real pooled SAE features: each row has
``nnz_per_row`` active latents (taken from the real pooled features of section 1) drawn from a
Zipf-like latent popularity, with positive count-like values, and the class changes how often a
small set of latents fires. (Real features for 5,000 texts would need ~5,000 texts through the LM,
which does not fit the time budget on a 2-core machine; the probe's cost depends on the shape and
sparsity, which match.) Each case runs in a fresh subprocess so its peak RSS is its own; sparse
cases count ``toarray``/``todense`` calls on big sparse matrices, which must stay 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    REPO,
    count_densify,
    current_rss_mib,
    peak_rss_mib,
    reset_peak_rss,
)


def synthetic_features(n_rows: int, width: int, nnz_per_row: int, seed: int = 0) -> tuple[Any, Any]:
    """(X csr float32 [n_rows, width], y) with a planted, partly informative signal."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_rows)
    p = 1.0 / np.arange(1, width + 1) ** 0.8
    p /= p.sum()
    rows = np.repeat(np.arange(n_rows), nnz_per_row)
    cols = rng.choice(width, size=rows.size, p=p)
    informative = rng.choice(width, size=64, replace=False)
    swap = (y[rows] == 1) & (rng.random(rows.size) < 0.02)
    cols = np.where(swap, informative[rng.integers(0, informative.size, rows.size)], cols)
    vals = rng.gamma(2.0, 3.0, rows.size).astype(np.float32)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, width), dtype=np.float32)
    X.sum_duplicates()
    return X, y


def child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp

    from mosaic_dag.probes.linear import fit_logistic

    X, y = synthetic_features(args.rows, args.width, args.nnz, args.seed)
    if args.dense:
        X = X.toarray()  # the comparison: the same data as a dense float32 array
    n = X.shape[0]
    idx = np.random.default_rng(args.seed + 1).permutation(n)
    tr, va, te = idx[: int(0.6 * n)], idx[int(0.6 * n): int(0.75 * n)], idx[int(0.75 * n):]
    parts = [X[tr], y[tr], X[va], y[va], X[te], y[te]]
    data_mib = (X.nbytes if not sp.issparse(X) else X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20
    reset_peak_rss()
    rss_before = current_rss_mib()
    with count_densify(min_elements=1 << 22) as dens:  # 4M cells: any pooled-feature-sized matrix
        t0 = time.perf_counter()
        res = fit_logistic(*parts, n_boot=args.n_boot)
        seconds = time.perf_counter() - t0
    return {
        "rows": n, "width": args.width, "dense": args.dense, "nnz_per_row": float(sp.csr_matrix(X).getnnz(axis=1).mean())
        if not args.dense else args.nnz, "data_mib": data_mib, "seconds": seconds, "C": res.params["C"],
        "macro_f1": res.metrics.macro_f1, "rss_before_fit_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
        "fit_peak_extra_mib": peak_rss_mib() - rss_before, "toarray_calls": dens["calls"],
        "big_toarray_calls": dens["big_calls"],
    }


def measure(width: int, dense: bool, *, rows: int, nnz: int, seed: int = 0, n_boot: int = 1000,
            timeout: float = 600) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.probe_fit", "--width", str(width), "--rows", str(rows), "--nnz", str(nnz),
           "--seed", str(seed), "--n-boot", str(n_boot)] + (["--dense"] if dense else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"width": width, "dense": dense, "rows": rows, "timed_out": True, "seconds": None,
                "note": f"stopped after {timeout:.0f} s"}
    if proc.returncode != 0:
        raise RuntimeError(f"probe child width={width} dense={dense} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    out["timed_out"] = False
    return out


def run(*, rows: int, nnz: int, widths: tuple[int, ...] = (16384, 65536), dense_widths: tuple[int, ...] = (16384, 65536),
        dense_timeout: float = 300, n_boot: int = 1000) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "nnz_per_row": nnz, "sparse": {}, "dense": {}}
    for w in widths:
        out["sparse"][str(w)] = measure(w, False, rows=rows, nnz=nnz, n_boot=n_boot)
    for w in dense_widths:
        out["dense"][str(w)] = measure(w, True, rows=rows, nnz=nnz, n_boot=n_boot, timeout=dense_timeout)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--nnz", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--dense", action="store_true")
    print(json.dumps(child(p.parse_args())))


if __name__ == "__main__":
    main()
