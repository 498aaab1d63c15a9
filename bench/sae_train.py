"""Section 5: SAE training steps per second against the fp32 matmul roofline, vs sae-lens's stock step.

Activations: the layer's real-token residual stream of real texts (tweets) from mosaic's hidden-state
cache (``extract_to_cache`` → ``HiddenCache``), held in memory as one float32 array, the way
``build_sae`` hands them to ``train_sae``; ``--synthetic-acts`` uses Gaussian data of the same shape.

What runs, on the same activations, batches and initial weights:
  (a) mosaic: ``train_sae``'s trainer (sae-lens's ``SAETrainer`` with fused Adam) on the
      ``SparseBatchTopKTrainingSAE`` step (dense encoder product only, sparse decoder and gradients);
  (b) sae-lens's own ``SAETrainer`` + ``BatchTopKTrainingSAE`` step, as its ``LanguageModelSAETrainingRunner``
      would run it. The runner itself needs a TransformerLens model from the Hugging Face hub (not
      reachable here), so its training step is measured on the same activations instead.
Steps of (a) and (b) and a matmul of the encoder's shape alternate, so all three see the same load.

FLOPs of a step (useful work): the dense encoder product 2 x batch x d_in x width, plus 2 x entries x
d_in for each of the four sparse products (decoder forward, decoder-weight gradient, encoder-weight
gradient, code gradient) over the winners (batch x k); the dead-latent aux loss when latents are dead
(none are in the timed window: it starts after ``dead_feature_window`` steps). Share of roofline =
FLOPs / fp32 peak / step time; the stock step's share uses the same FLOPs (its extra dense products are
work the architecture does not need).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load_average, median, merge_peaks, peak_matmul_gflops, spot_peak

TARGET = 0.50


def _trainer(acts: np.ndarray, width: int, k: int, batch: int, steps: int, stock: bool, seed: int = 0) -> Any:
    import torch
    from sae_lens import BatchTopKTrainingSAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from mosaic_dag.sae.training import _curve_trainer, _training_sae, activation_batches

    meta = {"model_name": "bench", "hook_name": "model.layers.6", "hf_hook_name": "model.layers.6.output",
            "hook_layer": 6, "prepend_bos": True, "dataset_path": None}
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4,
                           lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, device="cpu",
                           autocast=False, dead_feature_window=1000, feature_sampling_window=1000, n_checkpoints=0,
                           checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
                           n_batches_for_norm_estimate=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = _training_sae("batchtopk", acts.shape[1], width, k, None, meta)
        if stock:
            fast = sae
            sae = BatchTopKTrainingSAE(fast.cfg)
            sae.load_state_dict(fast.state_dict())
    data = activation_batches(acts, np.arange(acts.shape[0]), batch, seed)
    trainer = (SAETrainer if stock else _curve_trainer(SAETrainer, 1 << 30))(cfg=cfg, sae=sae, data_provider=data)
    trainer.curve = []
    trainer.activation_scaler.scaling_factor = float(np.sqrt(acts.shape[1]) / np.linalg.norm(acts[:4096], axis=1).mean())
    return trainer, data


def _steps(trainer: Any, data: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.step(next(data))
        trainer.n_training_steps += 1
    return (time.perf_counter() - t0) / n


def _matmul(batch: int, d: int, width: int) -> Any:
    import torch

    x, w, b = torch.randn(batch, d), torch.randn(d, width), torch.randn(width)
    return lambda: torch.addmm(b, x, w)


def measure(acts: np.ndarray, *, width: int, k: int, batches: list[int], threads: list[int], steps: int,
            repeats: int, stock_batch: int, peak: dict[str, Any]) -> dict[str, Any]:
    """Per batch size and thread count: median step time of (a), and at ``stock_batch`` of (b), interleaved."""
    import torch

    from mosaic_dag.sae.step import step_flops

    d = acts.shape[1]
    rows: list[dict[str, Any]] = []
    spots: list[dict[str, Any]] = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for batch in batches:
            fast, fdata = _trainer(acts, width, k, batch, 10**6, stock=False)
            stock = _trainer(acts, width, k, batch, 10**6, stock=True) if batch == stock_batch else None
            mm = _matmul(batch, d, width)
            _steps(fast, fdata, 2)
            if stock:
                _steps(*stock, 1)
            mm()
            t_fast, t_stock, t_mm = [], [], []
            for _ in range(repeats):
                if n_threads == max(threads):
                    spots.append(spot_peak(peak))
                t_fast.append(_steps(fast, fdata, steps))
                t0 = time.perf_counter()
                mm()
                t_mm.append(time.perf_counter() - t0)
                if stock:
                    t_stock.append(_steps(*stock, max(1, steps // 4)))
            flops = step_flops(batch, d, width, nnz=int(round(k * batch)))["total"]
            enc_flops = 2.0 * batch * d * width
            # each repeat's step against the encoder-shaped product timed right after it (same threads, same load)
            adjacent = [flops / tf / (enc_flops / tm) for tf, tm in zip(t_fast, t_mm)]
            row = {"threads": n_threads, "batch": batch, "step_s": median(t_fast), "tokens_per_s": batch / median(t_fast),
                   "flops_per_step": flops, "encoder_matmul_s": median(t_mm),
                   "encoder_matmul_gflops": enc_flops / median(t_mm) / 1e9,
                   "step_over_encoder_matmul": median(t_fast) / median(t_mm),
                   "share_of_adjacent_matmul": median(adjacent), "load_average": load_average()}
            if stock:
                row |= {"stock_step_s": median(t_stock), "stock_tokens_per_s": batch / median(t_stock),
                        "speedup_vs_stock": median(t_stock) / median(t_fast)}
            rows.append(row)
            print(f"[5] threads {n_threads} batch {batch}: {row['tokens_per_s']:.0f} tok/s "
                  f"({row['step_over_encoder_matmul']:.2f} encoder products per step; "
                  f"{100 * row['share_of_adjacent_matmul']:.0f}% of the adjacent product's rate; load {row['load_average']})"
                  + (f", stock {row['stock_tokens_per_s']:.0f} tok/s = {row['speedup_vs_stock']:.1f}x" if stock else ""),
                  flush=True)
    merged = merge_peaks(peak, *spots) if spots else peak
    for row in rows:
        row["achieved_gflops"] = row["flops_per_step"] / row["step_s"] / 1e9
        row["roofline_fraction"] = row["achieved_gflops"] / merged["float32"]["gflops"]
        # the 1-thread product against the all-threads roofline: what one thread can reach at most
        row["encoder_matmul_roofline_fraction"] = row["encoder_matmul_gflops"] / merged["float32"]["gflops"]
        if "stock_step_s" in row:
            row["stock_roofline_fraction"] = row["flops_per_step"] / row["stock_step_s"] / 1e9 / merged["float32"]["gflops"]
    return {"rows": rows, "peak": merged}


def profile(acts: np.ndarray, *, width: int, k: int, batch: int, threads: int, steps: int = 6, top: int = 14) -> dict[str, Any]:
    """Where a step's time goes: torch's profiler over ``steps`` steps of (a), ops by self time.

    scipy's products run inside the backward (``_StepBackward``'s self time); the encoder product is
    the ``aten::addmm`` of the forward.
    """
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    n_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    trainer, data = _trainer(acts, width, k, batch, 10**6, stock=False)
    _steps(trainer, data, 2)
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _steps(trainer, data, steps)
    wall = (time.perf_counter() - t0) / steps
    torch.set_num_threads(n_threads)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "calls_per_step": e.count / steps} for e in events[:top]]
    enc = next((o["ms_per_step"] for o in ops if o["op"] == "aten::addmm"), float("nan"))
    return {"batch": batch, "threads": threads, "step_ms_profiled": wall * 1e3, "encoder_ms": enc, "ops": ops,
            "load_average": load_average()}


def whole_training(acts: np.ndarray, *, width: int, k: int, batch: int, tokens: int, workdir: Path) -> dict[str, Any]:
    """``train_sae`` end to end (init, b_dec, steps, save, evaluation) on these activations."""
    from mosaic_dag.sae.training import train_sae

    t0 = time.perf_counter()
    res = train_sae(acts, hook_name="model.layers.6", model_name="bench", out_dir=workdir / "sae-train-whole",
                    training_tokens=tokens, width=width, k=k, batch_size=batch, eval_tokens=min(20_000, len(acts)))
    wall = time.perf_counter() - t0
    m = res.metrics
    return {"wall_s": wall, "training_tokens": m["training_tokens"], "tokens_per_s": m["training_tokens"] / wall,
            "explained_variance": m["explained_variance"], "dead_fraction": m["dead_fraction"], "l0": m["l0"]}


def real_acts(model_id: str, texts: list[str], layer: int, workdir: Path, max_length: int = 128) -> np.ndarray:
    """Real-token activations of ``texts`` at ``layer``, through mosaic's hidden-state cache."""
    from bench.run import load
    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache

    loaded = load(model_id, layer, "auto")
    folder = workdir / "sae-train-cache"
    extract_to_cache(loaded, texts, [layer], {layer: folder}, max_length=max_length, batch_tokens=2048)
    shard_acts = [np.asarray(s.acts[s.real_mask], dtype=np.float32) for s in HiddenCache(folder).iter_shards()]
    return np.concatenate(shard_acts)


def run(acts: np.ndarray, *, width: int = 4096, k: int = 32, batches: tuple[int, ...] = (1024, 2048, 4096),
        threads: tuple[int, ...] = (1, 2), steps: int = 4, repeats: int = 5, default_batch: int = 1024,
        whole_tokens: int = 0, workdir: Path | None = None, peak: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    n_threads = torch.get_num_threads()
    if default_batch not in batches:  # the stock step runs at the default batch size: take the first one asked for
        default_batch = batches[0]
    peak = peak or peak_matmul_gflops()
    out = measure(acts, width=width, k=k, batches=list(batches), threads=list(threads), steps=steps,
                  repeats=repeats, stock_batch=default_batch, peak=peak)
    torch.set_num_threads(n_threads)
    out |= {"tokens": int(acts.shape[0]), "d_in": int(acts.shape[1]), "width": width, "k": k,
            "default_batch": default_batch, "threads_default": n_threads, "target": TARGET}
    default = [r for r in out["rows"] if r["batch"] == default_batch and r["threads"] == n_threads]
    out["default"] = default[0] if default else out["rows"][-1]
    if whole_tokens and workdir is not None:
        out["whole"] = whole_training(acts, width=width, k=k, batch=default_batch, tokens=whole_tokens, workdir=workdir)
    return out


def table_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(f"5 SAE training, BatchTopK {r['width'] // 1024}k, k={r['k']}, {r['tokens']} activation rows (d_in {r['d_in']})",
             f"fp32 peak {r['peak']['float32']['gflops']:.0f} GFLOP/s")]
    for x in r["rows"]:
        v = (f"{x['tokens_per_s']:.0f} tok/s, {x['achieved_gflops']:.0f} GFLOP/s = {100 * x['roofline_fraction']:.0f}% of fp32 roofline; "
             f"{x['step_over_encoder_matmul']:.2f}x the encoder product's time = {100 * x['share_of_adjacent_matmul']:.0f}% of "
             f"the adjacent encoder-shaped product's rate ({x['encoder_matmul_gflops']:.0f} GFLOP/s = "
             f"{100 * x['encoder_matmul_roofline_fraction']:.0f}% of the roofline); load average {x['load_average']}")
        if "stock_step_s" in x:
            v += (f"; sae-lens stock step {x['stock_tokens_per_s']:.0f} tok/s ({100 * x['stock_roofline_fraction']:.0f}%), "
                  f"speed-up {x['speedup_vs_stock']:.1f}x")
        rows.append((f"5 batch {x['batch']}, {x['threads']} thread(s)", v))
    for pr in r.get("profiles", []):
        rows.append((f"5 profile batch {pr['batch']}, {pr['threads']} thread(s) (ms per step, profiled {pr['step_ms_profiled']:.0f})",
                     "; ".join(f"{o['op']} {o['ms_per_step']:.1f} ({100 * o['share']:.0f}%)" for o in pr["ops"][:10])))
    w = r.get("whole")
    if w:
        rows.append(("5 train_sae end to end", f"{w['training_tokens']} tokens in {w['wall_s']:.1f} s = {w['tokens_per_s']:.0f} tok/s; "
                     f"EV {w['explained_variance']:.2f}, dead {w['dead_fraction']:.2f}, L0 {w['l0']:.1f}"))
    return rows


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    x = r["default"]
    return {"target": f"5 SAE training (batch {x['batch']}, {x['threads']} threads) share of the fp32 roofline",
            "measured": f"{100 * x['roofline_fraction']:.1f}% (each step against the encoder-shaped product timed next to it: "
                        f"{100 * x['share_of_adjacent_matmul']:.1f}%; load average {x['load_average']})",
            "goal": f">= {100 * TARGET:.0f}%",
            "pass": x["roofline_fraction"] >= TARGET}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import tempfile

    from bench.common import setup_threads, tweets, write_json

    p = argparse.ArgumentParser(prog="python -m bench.sae_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default="bundled:gemma-3-270m")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--whole-tokens", type=int, default=100_000, help="tokens for one whole train_sae run (0: skip)")
    p.add_argument("--peak-repeats", type=int, default=5, help="runs per shape of the roofline matmuls (best is kept)")
    p.add_argument("--profile", type=int, nargs="*", default=[], metavar="BATCH",
                   help="also profile a step at these batch sizes (ops by self time, default threads)")
    p.add_argument("--synthetic-acts", type=int, default=0, help="N Gaussian rows (d 640) instead of real activations")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sae_train.json")
    args = p.parse_args(argv)
    setup_threads(None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_acts:
            acts = np.random.default_rng(0).standard_normal((args.synthetic_acts, 640)).astype(np.float32)
        else:
            acts = real_acts(args.model_id, tweets(args.texts), 6, Path(tmp))
        res = run(acts, width=args.width, batches=tuple(args.batches), threads=tuple(args.threads), steps=args.steps,
                  repeats=args.repeats, whole_tokens=args.whole_tokens, workdir=Path(tmp),
                  peak=peak_matmul_gflops(args.peak_repeats))
        res["profiles"] = [profile(acts, width=args.width, k=32, batch=b, threads=t) for b in args.profile for t in args.threads]
    res["verdict"] = verdict(res)
    for k, v in table_rows(res):
        print(f"| {k} | {v} |")
    v = res["verdict"]
    print(f"| {v['target']} | {v['measured']} | {v['goal']} | {'PASS' if v['pass'] else 'FAIL'} |")
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
