"""Section 6: codes, pooling and sparse probes of 16k-, 262k- and 1M-wide SAEs in bounded memory.

Gemma Scope 2 ships residual-stream SAEs up to 1M latents for d_model 640. Each width runs in a fresh
subprocess (``python -m bench.wide_sae --child ...``) so its peak RSS is its own: a JumpReLU SAE of
the real shape with random weights (decoder rows Kaiming-uniform, encoder = decoder transposed, one
threshold set so ~64 latents fire per token, like a trained SAE), the texts' layer activations
(computed once by the parent through mosaic's hidden-state cache, or Gaussian with
``--synthetic-acts``), then, per 4,096-token shard as ``build_codes`` does it: ``encode_sparse`` →
``encode_stats`` → ``pool_sparse(sum)``, and on the pooled rows ``fit_logistic`` (default grid and
bootstrap) and ``fit_ksparse`` (k=32). Labels are synthetic (text index mod 3): the timing and memory
of a fit do not depend on them.

Peak RSS is VmHWM reset after the SAE is built and the activations are loaded; the target is on
(peak RSS during the work) − (the SAE's weight bytes), which includes Python, torch and the activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, current_rss_mib, peak_rss_mib, reset_peak_rss

WIDTHS = (16_384, 262_144, 1_048_576)
LIMIT_MIB = 1024.0
SHARD_TOKENS = 4096
TARGET_L0 = 64


def random_jumprelu(d_in: int, width: int, calibration: np.ndarray) -> Any:
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=width, dtype="float32", device="cpu"))
    with torch.no_grad():
        cols = min(width, 16_384)  # columns are exchangeable: one tile of pre-activations sets the threshold
        x = torch.from_numpy(calibration[:256])
        pre = (x - sae.b_dec) @ sae.W_enc[:, :cols] + sae.b_enc[:cols]
        q = 1.0 - TARGET_L0 / width
        sae.threshold.fill_(float(torch.quantile(pre.flatten()[:1_000_000], q)))
    return sae


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.common import count_densify
    from mosaic_dag.features.pooling import pool_sparse
    from mosaic_dag.probes.ksparse import fit_ksparse
    from mosaic_dag.probes.linear import fit_logistic
    from mosaic_dag.probes.wide import active_columns
    from mosaic_dag.sae.encode import encode_sparse
    from mosaic_dag.sae.stats import encode_stats

    import scipy.sparse as sp

    torch.set_num_threads(args.threads)
    acts = np.load(args.acts)
    offsets = np.load(args.offsets)
    real = np.load(args.real)
    n_texts = len(offsets) - 1
    t0 = time.perf_counter()
    sae = random_jumprelu(acts.shape[1], args.width, acts[real])
    build_s = time.perf_counter() - t0
    weights_mib = sum(p.numel() * p.element_size() for p in sae.parameters()) / 2**20
    rss_before = current_rss_mib()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    pooled_parts, l0_sum, real_tokens = [], 0.0, 0
    with count_densify(min_elements=1 << 20) as dens:
        starts = list(range(0, n_texts, max(1, n_texts * SHARD_TOKENS // max(1, len(acts)))))
        for i, a in enumerate(starts):  # shards of whole texts, ~SHARD_TOKENS tokens each
            b = starts[i + 1] if i + 1 < len(starts) else n_texts
            lo, hi = int(offsets[a]), int(offsets[b])
            x, mask = acts[lo:hi], real[lo:hi]
            codes = encode_sparse(sae, x, real_mask=mask)
            stats = encode_stats(sae, x, codes=codes, real_mask=mask)
            l0_sum += stats.mean_l0 * stats.n_tokens
            real_tokens += stats.n_tokens
            pooled_parts.append(pool_sparse(codes, offsets[a : b + 1] - lo, mask, "sum"))
        encode_s = time.perf_counter() - t0
        rss_after_codes = peak_rss_mib()
        pooled = sp.vstack(pooled_parts, format="csr")
        y = np.arange(n_texts) % 3
        n_tr, n_va = int(0.6 * n_texts), int(0.2 * n_texts)
        tr, va, te = slice(0, n_tr), slice(n_tr, n_tr + n_va), slice(n_tr + n_va, n_texts)
        t1 = time.perf_counter()
        fit_logistic(pooled[tr], y[tr], pooled[va], y[va], pooled[te], y[te])
        logistic_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        fit_ksparse(pooled[tr], y[tr], pooled[va], y[va], pooled[te], y[te], k=32)
        ksparse_s = time.perf_counter() - t1
    peak = peak_rss_mib()
    per_1k = 1000.0 / n_texts
    return {
        "width": args.width, "texts": n_texts, "tokens": int(len(acts)), "real_tokens": real_tokens,
        "mean_l0": l0_sum / max(1, real_tokens), "pooled_nnz": int(pooled.nnz), "sae_build_s": build_s,
        "sae_weights_mib": weights_mib, "rss_before_work_mib": rss_before, "peak_rss_work_mib": peak,
        "peak_above_weights_mib": peak - weights_mib, "peak_above_start_mib": peak - rss_before,
        "peak_after_codes_mib": rss_after_codes, "vmhwm_reset": reset,
        "encode_pool_s": encode_s, "logistic_s": logistic_s, "ksparse_s": ksparse_s,
        "encode_pool_s_per_1k_texts": encode_s * per_1k, "probes_s_per_1k_texts": (logistic_s + ksparse_s) * per_1k,
        "encode_gflop": 2.0 * acts.shape[1] * args.width * real_tokens / 1e9,
        "big_densifications": dens["big_calls"], "big_densified_vectors": dens["big_vectors"],
        "densified_where": dens["where"], "fit_active_columns": int(active_columns(pooled[: n_tr + n_va]).size),
        "threads": args.threads,
    }


def texts_acts(n: int, synthetic: bool, model_id: str, workdir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(acts, offsets, real mask) for ``n`` tweets at layer 6, and where they came from."""
    if synthetic:
        rng = np.random.default_rng(0)
        lengths = rng.integers(8, 40, size=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        real = np.ones(int(offsets[-1]), dtype=bool)
        real[offsets[:-1]] = False  # BOS
        return rng.standard_normal((int(offsets[-1]), 640)).astype(np.float32), offsets, real, "synthetic Gaussian"
    from bench.common import tweets
    from bench.run import load
    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache

    loaded = load(model_id, 6, "auto")
    folder = workdir / "wide-cache"
    extract_to_cache(loaded, tweets(n), [6], {6: folder}, max_length=128, batch_tokens=2048)
    shards = list(HiddenCache(folder).iter_shards())
    acts, offs, real, base = [], [0], [], 0
    for s in shards:  # texts in cache order (the pooled rows' order does not matter for timing)
        acts.append(np.asarray(s.acts, dtype=np.float32))
        real.append(np.asarray(s.real_mask, dtype=bool))
        offs.extend((np.asarray(s.offsets[1:]) + base).tolist())
        base += len(s.acts)
    return np.concatenate(acts), np.asarray(offs, dtype=np.int64), np.concatenate(real), f"tweets through {model_id}, layer 6"


def run(n_texts: int = 1000, widths: tuple[int, ...] = WIDTHS, threads: int = 2, synthetic: bool = False,
        model_id: str = "bundled:gemma-3-270m", timeout: float = 1800) -> dict[str, Any]:
    out: dict[str, Any] = {"texts": n_texts, "widths": {}, "limit_mib": LIMIT_MIB}
    with tempfile.TemporaryDirectory() as tmp:
        acts, offsets, real, source = texts_acts(n_texts, synthetic, model_id, Path(tmp))
        out["source"] = source
        paths = {k: Path(tmp) / f"{k}.npy" for k in ("acts", "offsets", "real")}
        for k, v in (("acts", acts), ("offsets", offsets), ("real", real)):
            np.save(paths[k], v)
        del acts
        for w in widths:
            res_file = Path(tmp) / f"res-{w}.json"
            cmd = [sys.executable, "-m", "bench.wide_sae", "--child", "--width", str(w), "--threads", str(threads),
                   "--acts", str(paths["acts"]), "--offsets", str(paths["offsets"]), "--real", str(paths["real"]),
                   "--result", str(res_file)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                out["widths"][str(w)] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
                print(f"[6] width {w}: failed: {out['widths'][str(w)]['error']}", flush=True)
                continue
            r = json.loads(res_file.read_text())
            r["wall_s"] = time.perf_counter() - t0
            out["widths"][str(w)] = r
            print(f"[6] width {w}: encode+stats+pool {r['encode_pool_s']:.1f} s, probes {r['logistic_s'] + r['ksparse_s']:.1f} s "
                  f"for {r['texts']} texts; peak RSS {r['peak_rss_work_mib']:.0f} MiB = weights {r['sae_weights_mib']:.0f} + "
                  f"{r['peak_above_weights_mib']:.0f} MiB", flush=True)
    return out


def table_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for w, x in r["widths"].items():
        label = f"6 width {int(w) // 1024}k JumpReLU (random, d 640), {r['texts']} texts ({r.get('source', '')})"
        if "error" in x:
            rows.append((label, f"failed: {x['error']}"))
            continue
        rows.append((label, f"per 1k texts: codes+stats+pool {x['encode_pool_s_per_1k_texts']:.1f} s, probes "
                     f"{x['probes_s_per_1k_texts']:.1f} s; peak RSS {x['peak_rss_work_mib']:.0f} MiB (weights "
                     f"{x['sae_weights_mib']:.0f} MiB, above them {x['peak_above_weights_mib']:.0f} MiB); L0 {x['mean_l0']:.0f}; "
                     f"{x['big_densifications']} densifications; logistic fitted on {x.get('fit_active_columns', '?')} active columns"))
    return rows


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    xs = r["widths"]
    ok = bool(xs) and all("error" not in x and x["peak_above_weights_mib"] < LIMIT_MIB and x["big_densifications"] == 0
                          for x in xs.values())
    measured = ", ".join(f"{int(w) // 1024}k: {x['peak_above_weights_mib']:.0f} MiB" if "error" not in x else f"{int(w) // 1024}k: failed"
                         for w, x in xs.items())
    return {"target": "6 wide SAEs: peak RSS above the SAE's weights", "measured": measured,
            "goal": f"< {LIMIT_MIB:.0f} MiB each, 0 densifications", "pass": ok}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wide_sae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--acts", default="", help=argparse.SUPPRESS)
    p.add_argument("--offsets", default="", help=argparse.SUPPRESS)
    p.add_argument("--real", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--widths", type=int, nargs="*", default=list(WIDTHS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic-acts", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wide_sae.json")
    args = p.parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(child(args)))
        return
    from bench.common import write_json

    res = run(args.texts, tuple(args.widths), args.threads, args.synthetic_acts)
    res["verdict"] = verdict(res)
    for k, v in table_rows(res):
        print(f"| {k} | {v} |")
    v = res["verdict"]
    print(f"| {v['target']} | {v['measured']} | {v['goal']} | {'PASS' if v['pass'] else 'FAIL'} |")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
