"""mosaic benchmark: ``python -m bench.run`` (``make bench``). Prints a table, writes bench/results/*.json.

Sections (all measured in this one run, on this machine; timings are medians of ``--repeats``):
  1. extraction throughput: mosaic's pipeline vs the seed tool's per-text loop, + matmul roofline
  2. cache reuse: a second SAE on a cached layer, LM forward calls counted
  3. memory: peak RSS for 1k vs 8k texts, each in a fresh subprocess
  4. probe fitting: fit_logistic on sparse 16k/65k-wide features vs dense
  5. SAE training: steps/s vs the fp32 roofline, against sae-lens's stock step (bench/sae_train.py)
  6. wide SAEs: codes, pooling and sparse probes at 16k/262k/1M latents, peak RSS per width (bench/wide_sae.py)
  7. parallel partitions: the end-to-end experiment with 1 and 2 worker processes (opt-in: long)
  8. end to end: one experiment through `mosaic run`, per stage (opt-in: long; bench/end_to_end.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cache_reuse, end_to_end, memory, probe_fit, sae_train, throughput, wide_sae
from bench.common import (
    REPO,
    MissingData,
    jailbreak_prompts,
    load_average,
    machine,
    merge_peaks,
    peak_matmul_gflops,
    setup_threads,
    spot_peak,
    tweets,
    write_json,
)
from mosaic_dag.lm.models import dtype_name

BUNDLED = "bundled:gemma-3-270m"
TARGETS = {"speedup": 12.0, "roofline": 0.70, "forward_calls": 0, "rss_ratio": 1.3, "fit_65k_s": 10.0}


def synthetic_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """Word-salad texts of varied length (smoke tests; machines without ../shared/data)."""
    import numpy as np

    words = ["you", "are", "a", "the", "and", "to", "of", "in", "it", "is", "was", "for", "on", "with", "this", "that", "my", "your", "i", "we", "they", "hello", "world", "thank", "great", "stupid", "idiot", "lovely", "kind", "friend", "post", "comment", "idea", "day", "good", "bad", "hate", "love", "nice", "go", "away", "here"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(min_words, max_words + 1)))) for _ in range(n)]


def load(model_id: str, layer: int, dtype: str = "auto") -> Any:
    from mosaic_dag.config import ModelConfig
    from mosaic_dag.lm.models import load_model
    from mosaic_dag.paths import models_dir

    cfg = ModelConfig(name="gemma-3-270m" if model_id == BUNDLED else "m", id=model_id, layers=[layer], dtype=dtype,
                      device="cpu")
    return load_model(cfg, models_dir())


def train_saes(loaded: Any, texts: list[str], layer: int, widths: tuple[int, ...], *, max_length: int,
               batch_tokens: int, workdir: Path, training_tokens: int) -> dict[int, dict[str, Any]]:
    """Train one SAE per width with mosaic's ``train_sae`` on these texts' activations (quick, few steps).

    TopK, so every token has exactly k active latents however short the training: the codes have
    the sparsity of a real SAE (a few-step BatchTopK/JumpReLU threshold is far too low), which is
    what the encode/pool/probe costs depend on. Reconstruction quality is reported, not needed.
    """
    import numpy as np

    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache
    from mosaic_dag.sae.loading import load_sae
    from mosaic_dag.sae.training import train_sae

    folder = workdir / "sae-train-acts"
    extract_to_cache(loaded, texts, [layer], {layer: folder}, max_length=max_length, batch_tokens=batch_tokens)
    shard = HiddenCache(folder).load_all()
    n_real = int(shard.real_mask.sum())
    batch = int(min(1024, max(16, n_real // 4)))
    out = {}
    for width in widths:
        t0 = time.perf_counter()
        trained = train_sae(np.asarray(shard.acts, dtype=np.float32), hook_name=f"model.layers.{layer}",
                            model_name=loaded.hf_name, out_dir=workdir / f"sae-{width}", layer=layer,
                            training_tokens=max(training_tokens, batch), architecture="topk", width=width,
                            k=min(32, width), batch_size=batch, real_mask=shard.real_mask,
                            eval_tokens=min(4096, n_real))
        out[width] = {"path": trained.path, "sae": load_sae(path=trained.path), "seconds": time.perf_counter() - t0,
                      "l0": trained.metrics["l0"], "explained_variance": trained.metrics["explained_variance"],
                      "training_tokens": trained.metrics["training_tokens"]}
    shutil.rmtree(folder, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- report


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target, with the measured value and PASS/FAIL."""
    rows = []
    t = r.get("throughput")
    if t:
        a = t["mosaic"]
        kind = r.get("machine", {}).get("cpu_kind", {}).get("label", "?")
        rows.append({"target": f"1 speedup mosaic ({a['dtype']}, the default on this CPU: {kind}) / seed loop (fp32)",
                     "measured": f"{t['speedup']:.1f}x (ceiling on this CPU {t['speedup_ceiling']:.1f}x)",
                     "goal": f">= {TARGETS['speedup']:.0f}x", "pass": t["speedup"] >= TARGETS["speedup"]})
        frac = a["roofline_fraction"]
        rows.append({"target": f"1 share of the matmul roofline (a) ({a['dtype']} forward, {a['sae_dtype']} SAE)",
                     "measured": f"{100 * frac:.1f}%", "goal": f">= {100 * TARGETS['roofline']:.0f}%",
                     "pass": frac >= TARGETS["roofline"]})
        h = t.get("float32_option")
        if h:  # the same measures for the non-default dtype: shown for reference, not targets
            rows.append({"target": "1 (reference) speedup with dtype: float32 (an option, not the default)",
                         "measured": f"{h['speedup']:.1f}x", "goal": "-", "pass": None})
            rows.append({"target": "1 (reference) share of fp32 matmul roofline, dtype: float32",
                         "measured": f"{100 * h['roofline_fraction']:.1f}%", "goal": "-", "pass": None})
    c = r.get("cache_reuse")
    if c:
        n = c["second"]["forward_calls"]
        rows.append({"target": "2 LM forwards for a 2nd SAE on a cached layer", "measured": str(n), "goal": "0",
                     "pass": n == 0 and c["second"]["cache_hit"]})
    m = r.get("memory")
    if m:
        rows.append({"target": f"3 peak RSS {m['sizes'][1]} / {m['sizes'][0]} texts", "measured":
                     f"{m['ratio']:.3f} (+{m['growth_mib']:.0f} MiB)",
                     "goal": f"<= {TARGETS['rss_ratio']}", "pass": m["ratio"] <= TARGETS["rss_ratio"]})
    p = r.get("probes")
    if p:
        widest = max(p["sparse"], key=int)
        s = p["sparse"][widest]
        ok = s["seconds"] <= TARGETS["fit_65k_s"] and s["big_toarray_calls"] == 0
        rows.append({"target": f"4 fit_logistic {int(widest) // 1024}k wide, sparse", "measured":
                     f"{s['seconds']:.1f} s, {s['big_toarray_calls']} densifications",
                     "goal": f"<= {TARGETS['fit_65k_s']:.0f} s, 0", "pass": ok})
    if r.get("sae_train"):
        rows.append(sae_train.verdict(r["sae_train"]))
    if r.get("wide_sae"):
        rows.append(wide_sae.verdict(r["wide_sae"]))
    return rows


def _fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def table(r: dict[str, Any]) -> str:
    """Markdown: the measurements, then the targets."""
    lines = ["| measurement | value |", "|---|---|"]
    add = lambda k, v: lines.append(f"| {k} | {v} |")
    pk = r.get("peak")
    if pk:
        add("matmul peak fp32 / bf16 (torch.matmul or oneDNN, best shape, measured)", f"{pk['float32']['gflops']:.0f} / {pk['bfloat16']['gflops']:.0f} GFLOP/s")
    t = r.get("throughput")
    if t:
        a, b = t["mosaic"], t["seed_loop"]
        add(f"texts, tokens (layer {t['layer']}, max_length {t['max_length']}, SAE {t['d_sae'] // 1024}k)",
            f"{t['texts']} texts, {t['tokens']} tokens ({t['truncated_texts']} truncated)")
        add(f"(a) mosaic pipeline, default dtype = {a['dtype']} (SAE {a['sae_dtype']}), batch_tokens={t['batch_tokens']}",
            f"{a['tokens_per_s']:.0f} tok/s ({a['median_s']:.1f} s; forward {a['forward_s_median']:.1f} s, "
            f"codes+pool {a['encode_pool_s_median']:.1f} s)")
        add("(a) achieved; share of roofline (time at peak / time)", f"{a['achieved_gflops']:.1f} GFLOP/s; {100 * a['roofline_fraction']:.1f}% "
            f"(forward alone {100 * a['forward_only_roofline_fraction']:.0f}% of {a['dtype']} peak)")
        if "paired_roofline_fraction" in a:
            add("(a) each run against the peak measured just before it (drift check; median)",
                f"{100 * a['paired_roofline_fraction']:.1f}% (runs: "
                + ", ".join(f"{100 * x:.0f}%" for x in a["paired_roofline_fractions"]) + ")")
        add(f"(b) seed loop, {b['dtype']} ({b['texts']} length-matched texts)",
            f"{b['tokens_per_s']:.1f} tok/s ({b['median_s']:.1f} s; {b['achieved_gflops']:.1f} GFLOP/s)")
        add("speedup (a)/(b); FLOP ratio (b)/(a) per token", f"{t['speedup']:.1f}x; {t['flop_ratio_seed_over_mosaic_per_token']:.1f}x")
        add("speedup ceiling: (a) at 100% of its roofline vs (b) as measured", f"{t['speedup_ceiling']:.1f}x")
        add("(a) vs (b) pooled features, relative difference", f"{t['agreement']['relative_frobenius_diff']:.2e}")
        h = t.get("float32_option")
        if h:
            par = h["default_vs_fp32"]["activation_parity"]
            add("(a) with dtype: float32 (option)", f"{h['tokens_per_s']:.0f} tok/s = {h['speedup']:.1f}x (b); "
                f"{h['achieved_gflops']:.0f} GFLOP/s = {100 * h['roofline_fraction']:.0f}% of fp32 roofline "
                f"(forward {h['forward_s_median']:.1f} s, codes+pool {h['encode_pool_s_median']:.1f} s)")
            add(f"{a['dtype']} vs fp32 layer activations (real tokens)", f"max rel. diff {par['max_rel']:.1e}, median {par['median_row_max_rel']:.1e}; "
                f"pooled features {h['default_vs_fp32']['pooled_feature_relative_diff']:.1e}")
        for s in t.get("batch_tokens_sweep", []):
            add(f"forward only, batch_tokens={s['batch_tokens']}", f"{s['tokens_per_s']:.0f} tok/s ({s['batches']} batches)")
    c = r.get("cache_reuse")
    if c:
        add(f"cache reuse, {c['texts']} texts: 1st SAE (miss)", f"{_fmt_s(c['first']['seconds'])}, {c['first']['forward_calls']} forward calls")
        add("cache reuse: 2nd SAE (hit)", f"{_fmt_s(c['second']['seconds'])}, {c['second']['forward_calls']} forward calls, "
            f"{c['second']['model_loads']} model loads")
    m = r.get("memory")
    if m:
        for k in ("small", "big"):
            x = m[k]
            add(f"peak RSS, {x['texts']} texts ({x['tokens']} tokens, {x['shards']} shards)",
                f"{x['work_peak_rss_mib']:.0f} MiB (model paged in: {x['rss_after_load_mib']:.0f} MiB); "
                f"whole process {x['process_peak_rss_mib']:.0f} MiB; {x['wall_s']:.0f} s")
    p = r.get("probes")
    if p:
        for kind in ("sparse", "dense"):
            for w, x in p[kind].items():
                label = f"fit_logistic {kind} {int(w) // 1024}k x {p['rows']}"
                if x.get("timed_out"):
                    add(label, f"not finished ({x['note']})")
                else:
                    add(label, f"{x['seconds']:.1f} s, +{x['fit_peak_extra_mib']:.0f} MiB peak during fit, data {x['data_mib']:.0f} MiB")
    for section, mod in (("sae_train", sae_train), ("wide_sae", wide_sae), ("end_to_end", end_to_end)):
        if r.get(section):
            for k, v in mod.table_rows(r[section]):
                add(k, v)
    lines += ["", "| target | measured | goal | result |", "|---|---|---|---|"]
    for v in r.get("verdicts", []):
        verdict = "-" if v["pass"] is None else "PASS" if v["pass"] else "FAIL"
        lines.append(f"| {v['target']} | {v['measured']} | {v['goal']} | {verdict} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=BUNDLED, help="model to benchmark (default: the bundled Gemma 3 270M)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--texts", type=int, default=256, help="texts for section 1 (real jailbreak prompts)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed-texts", type=int, default=32, help="length-matched texts the slow seed loop runs on")
    p.add_argument("--sae-width", type=int, default=16384)
    p.add_argument("--small-sae-width", type=int, default=2048, help="SAE for the memory and cache sections")
    p.add_argument("--sae-training-tokens", type=int, default=8192)
    p.add_argument("--no-fp32", action="store_true",
                   help="skip the fp32 option run of (a); the seed loop then runs in the default dtype too")
    p.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="batch_tokens values for an extra forward-only sweep, e.g. --sweep 512 1024 4096 8192")
    p.add_argument("--cache-texts", type=int, default=128)
    p.add_argument("--cache-max-length", type=int, default=64)
    p.add_argument("--memory-sizes", type=int, nargs=2, default=[1000, 8000])
    p.add_argument("--memory-max-length", type=int, default=12)
    p.add_argument("--probe-rows", type=int, default=5000)
    p.add_argument("--probe-widths", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--dense-widths", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--dense-timeout", type=float, default=180)
    p.add_argument("--peak-max-dim", type=int, default=4096,
                   help="largest matmul dimension of the roofline measurement (smaller: quicker and lower)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: usable cores)")
    p.add_argument("--sae-train-texts", type=int, default=1000, help="tweets whose activations section 5 trains on")
    p.add_argument("--sae-train-batches", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--sae-train-threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--sae-train-whole-tokens", type=int, default=100_000, help="one whole train_sae run (0: skip)")
    p.add_argument("--wide-texts", type=int, default=1000)
    p.add_argument("--wide-widths", type=int, nargs="*", default=list(wide_sae.WIDTHS))
    p.add_argument("--e2e-rows", type=int, default=1000, help="texts per language for sections 7/8")
    p.add_argument("--e2e-training-tokens", type=int, default=200_000)
    p.add_argument("--sections", default="123456",
                   help="which sections to run, e.g. 13; 7 (1 vs 2 workers) and 8 (end to end) are long, opt-in")
    p.add_argument("--synthetic-texts", action="store_true", help="word-salad texts instead of ../shared/data")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    threads = setup_threads(args.threads or None)
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {"started": stamp, "machine": machine(), "threads": threads, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "targets": TARGETS, "skipped": {}}
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-bench-", dir=args.workdir))
    print(f"mosaic bench: {res['machine']['cpu']}, {res['machine']['usable_cpus']} cpus, torch threads {threads}, "
          f"load average {res['machine']['load_average_at_start']}; CPU kind: {res['machine']['cpu_kind']['label']} "
          f"(dtype auto = {res['machine']['cpu_kind']['auto_dtype']})", flush=True)
    try:
        if args.synthetic_texts:
            texts = synthetic_texts(args.texts)
            short = synthetic_texts(max(args.memory_sizes), seed=1, min_words=2, max_words=12)
        else:
            try:
                texts = jailbreak_prompts(max(args.texts, args.cache_texts))
                short = tweets(max(args.memory_sizes)) if "3" in args.sections else []
            except MissingData as err:
                print(f"mosaic bench: skipped — {err}. Run with --synthetic-texts to benchmark on generated text.")
                res["skipped"]["all"] = str(err)
                return res

        print("[peak] measuring matmul roofline ...", flush=True)
        res["peak"] = peak_matmul_gflops(max_dim=args.peak_max_dim)
        print(f"[peak] fp32 {res['peak']['float32']['gflops']} GFLOP/s, bf16 {res['peak']['bfloat16']['gflops']} GFLOP/s", flush=True)

        t0 = time.perf_counter()
        loaded = load(args.model_id, args.layer, "float32")  # the seed loop's dtype; trains the bench SAEs
        default = load(args.model_id, args.layer, "auto")  # what mosaic runs by default on this machine
        res["model"] = {"id": args.model_id, "hf_name": loaded.hf_name, "blocks": loaded.n_layers,
                        "default_dtype": dtype_name(default.dtype),
                        "d_model": loaded.d_model, "load_s": time.perf_counter() - t0}
        print(f"[model] {loaded.hf_name}: {loaded.n_layers} blocks, d_model {loaded.d_model}", flush=True)

        widths = tuple(sorted({args.sae_width, args.small_sae_width}))
        saes = train_saes(loaded, texts[: args.texts], args.layer, widths, max_length=args.max_length,
                          batch_tokens=args.batch_tokens, workdir=workdir, training_tokens=args.sae_training_tokens)
        res["saes"] = {str(w): {k: v for k, v in s.items() if k != "sae"} for w, s in saes.items()}
        print("[sae] trained " + ", ".join(f"{w}: L0 {s['l0']:.1f}, EV {s['explained_variance']:.2f}, {s['seconds']:.0f} s"
                                          for w, s in saes.items()), flush=True)
        big_sae, small_sae = saes[args.sae_width], saes[args.small_sae_width]

        if "1" in args.sections:
            print("[1] extraction throughput ...", flush=True)
            res["throughput"] = throughput.run(default, big_sae["sae"], texts[: args.texts], args.layer,
                                               max_length=args.max_length, batch_tokens=args.batch_tokens,
                                               repeats=args.repeats, seed_texts=args.seed_texts, peak=res["peak"],
                                               workdir=workdir, loaded_fp32=None if args.no_fp32 else loaded,
                                               sweep=args.sweep, spot=lambda: spot_peak(res["peak"]))
            res["throughput"]["load_average_after"] = load_average()
            # Roofline = the best of all measurements (before and after the section, and the spot
            # measurements before each run of (a)).
            res["peak_first"] = res["peak"]
            res["peak"] = merge_peaks(res["peak"], peak_matmul_gflops(max_dim=args.peak_max_dim), *res["throughput"]["mosaic"].get("spot_peaks", []))
            throughput.refraction(res["throughput"], res["peak"])
            t = res["throughput"]
            print(f"[1] mosaic {t['mosaic']['tokens_per_s']:.0f} tok/s, seed loop {t['seed_loop']['tokens_per_s']:.1f} tok/s, "
                  f"speedup {t['speedup']:.1f}x, {100 * t['mosaic']['roofline_fraction']:.1f}% of roofline", flush=True)
        if "2" in args.sections:
            print("[2] cache reuse ...", flush=True)
            ctexts = texts[: args.cache_texts]
            labels = ["a" if i % 2 else "b" for i in range(len(ctexts))]
            res["cache_reuse"] = cache_reuse.run(args.model_id, ctexts, labels, args.layer, small_sae["sae"], big_sae["sae"],
                                                 workdir=workdir / "cache", max_length=args.cache_max_length,
                                                 batch_tokens=args.batch_tokens, loaded=default)
            print(f"[2] second SAE: {res['cache_reuse']['second']['forward_calls']} forward calls", flush=True)
        if "3" in args.sections:
            print(f"[3] memory, {args.memory_sizes} texts in subprocesses ...", flush=True)
            res["memory"] = memory.run(short, tuple(args.memory_sizes), model_id=args.model_id,
                                       sae_path=small_sae["path"], layer=args.layer,
                                       max_length=args.memory_max_length, batch_tokens=args.batch_tokens,
                                       threads=threads, workdir=workdir)
            print(f"[3] peak RSS ratio {res['memory']['ratio']:.3f}", flush=True)
        if "4" in args.sections:
            nnz = 300
            if "throughput" in res:  # real pooled features' density
                nnz = max(1, round(res["throughput"]["agreement"]["active_latents_per_text_mosaic"]))
            print(f"[4] probe fitting, {args.probe_rows} rows, {nnz} active latents per row ...", flush=True)
            res["probes"] = probe_fit.run(rows=args.probe_rows, nnz=nnz, widths=tuple(args.probe_widths),
                                          dense_widths=tuple(args.dense_widths), dense_timeout=args.dense_timeout)
        if "5" in args.sections:
            print("[5] SAE training ...", flush=True)
            import numpy as np

            acts = (np.random.default_rng(0).standard_normal((args.sae_train_texts * 20, default.d_model)).astype(np.float32)
                    if args.synthetic_texts else
                    sae_train.real_acts(args.model_id, tweets(args.sae_train_texts), args.layer, workdir))
            res["sae_train"] = sae_train.run(acts, batches=tuple(args.sae_train_batches), threads=tuple(args.sae_train_threads),
                                             whole_tokens=args.sae_train_whole_tokens, workdir=workdir, peak=res["peak"])
        if "6" in args.sections:
            print(f"[6] wide SAEs {args.wide_widths}, {args.wide_texts} texts, one subprocess per width ...", flush=True)
            res["wide_sae"] = wide_sae.run(args.wide_texts, tuple(args.wide_widths), threads, args.synthetic_texts, args.model_id)
        if "7" in args.sections or "8" in args.sections:
            w = (1, 2) if "7" in args.sections else (1,)
            res["end_to_end"] = end_to_end.run(args.e2e_rows, w, args.e2e_training_tokens, peak=res["peak"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["verdicts"] = verdicts(res)
    res["total_s"] = time.perf_counter() - started
    res["load_average_at_end"] = load_average()
    md = table(res)
    res["table_markdown"] = md
    print()
    print(md)
    print(f"\ntotal {res['total_s'] / 60:.1f} min; load average at end {res['load_average_at_end']}")
    write_json(args.out / f"bench-{stamp}.json", res)
    write_json(args.out / "latest.json", res)
    (args.out / "latest.md").write_text(md + "\n")
    print(f"wrote {args.out / f'bench-{stamp}.json'}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
