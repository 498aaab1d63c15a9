"""Section 1: texts -> pooled SAE features, mosaic's pipeline vs a re-implementation of the seed loop.

(a) mosaic: ``extract_to_cache`` (length-sorted token-budget batches, forward stopped after block L,
    no LM head) -> per shard ``encode_sparse`` -> ``pool_sparse(..., "sum")``.
(b) seed loop: one text at a time, the full causal LM forward (logits computed) with
    ``output_hidden_states=True``, a dense ``sae.encode`` of the layer's hidden states, sum pooling.

Both see the same texts, the same tokens (BOS included, truncated to ``max_length``) and the same SAE,
and both pool over the same real tokens (BOS excluded), so their outputs are compared too.

FLOP count (used for the roofline fraction; "useful" FLOPs, i.e. padding and masked attention
entries are not counted):
    linear layers: 2 x (weights of every nn.Linear in blocks 0..L) x tokens
    attention:     per block, 2 matmuls (QK^T, AV) x 2 FLOP x heads x head_dim x sum_i T_i(T_i+1)/2
                   (causal: token t attends to t+1 positions)
    SAE encode:    2 x d_in x d_sae x real tokens (the encoder matmul; bias/threshold ignored)
Norms, activations, rotary embeddings and the embedding lookup are not counted (not matmuls).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from bench.common import median
from mosaic_dag.lm.models import dtype_name

# --------------------------------------------------------------------------- FLOPs


def forward_flops(loaded: Any, layer: int | None, lengths: Sequence[int], lm_head: bool = False) -> dict[str, float]:
    """Useful FLOPs of a forward through blocks 0..layer (all blocks when None) over texts of ``lengths``."""
    import torch

    from mosaic_dag.lm.models import decoder_layers

    blocks = decoder_layers(loaded.model)
    used = blocks if layer is None else blocks[: layer + 1]
    linear = sum(m.weight.numel() for b in used for m in b.modules() if isinstance(m, torch.nn.Linear))
    cfg = loaded.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    lengths = np.asarray(lengths, dtype=np.float64)
    tokens = float(lengths.sum())
    pairs = float((lengths * (lengths + 1) / 2).sum())
    out = {
        "linear_params": float(linear),
        "linear": 2.0 * linear * tokens,
        "attention": len(used) * 2 * 2.0 * heads * head_dim * pairs,
        "lm_head": 0.0,
    }
    if lm_head:
        out["lm_head"] = 2.0 * int(cfg.vocab_size) * int(cfg.hidden_size) * tokens
    out["total"] = out["linear"] + out["attention"] + out["lm_head"]
    return out


def sae_flops(d_in: int, d_sae: int, tokens: int) -> float:
    return 2.0 * d_in * d_sae * tokens


# --------------------------------------------------------------------------- (a) mosaic


def mosaic_features(loaded: Any, sae: Any, texts: Sequence[str], layer: int, *, max_length: int,
                    batch_tokens: int, workdir: Path) -> tuple[sp.csr_matrix, dict[str, Any]]:
    """Pooled (sum) SAE features [n_texts, d_sae] in text order, streaming the cache shard by shard."""
    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache
    from mosaic_dag.features.pooling import pool_sparse
    from mosaic_dag.sae.encode import encode_sparse

    target = Path(workdir) / f"cache-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    stats = extract_to_cache(loaded, texts, [layer], {layer: target}, max_length=max_length, batch_tokens=batch_tokens)
    t1 = time.perf_counter()
    pooled, rows = [], []
    for shard in HiddenCache(target).iter_shards():
        codes = encode_sparse(sae, shard.acts, real_mask=shard.real_mask)
        pooled.append(pool_sparse(codes, shard.offsets, shard.real_mask, "sum"))
        rows.append(shard.rows)
    X = sp.csr_matrix(sp.vstack(pooled, format="csr"))
    X = X[np.argsort(np.concatenate(rows))]
    t2 = time.perf_counter()
    shutil.rmtree(target, ignore_errors=True)
    return X, {"tokens": stats.tokens, "real_tokens": stats.real_tokens, "batches": stats.batches,
               "forward_calls": stats.forward_calls, "extract_s": t1 - t0, "forward_s": stats.seconds,
               "encode_pool_s": t2 - t1}


# --------------------------------------------------------------------------- (b) seed loop


def seed_loop_features(loaded: Any, sae: Any, texts: Sequence[str], layer: int, *, max_length: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The seed tool's loop, re-implemented: per text a full LM forward + dense SAE encode + sum.

    (Layer L is read as ``hidden_states[L + 1]`` = resid_post of block L, the same activation mosaic
    caches, so the two outputs can be compared; the seed scripts' off-by-one is not reproduced.)
    """
    import torch

    from mosaic_dag.lm.extract import special_ids

    tok, model = loaded.tokenizer, loaded.model
    specials = torch.as_tensor(special_ids(tok))
    rows, tokens, real_tokens = [], 0, 0
    for text in texts:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=max_length)
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)  # full forward: every block + LM head
            hidden = out.hidden_states[layer + 1][0]
            z = sae.encode(hidden.to(sae.W_enc.dtype))  # dense [T, d_sae]
            real = ~torch.isin(enc["input_ids"][0], specials)
            rows.append(z[real].sum(dim=0).float().numpy())
        tokens += int(enc["input_ids"].shape[1])
        real_tokens += int(real.sum())
        del out
    return np.stack(rows), {"tokens": tokens, "real_tokens": real_tokens, "forward_calls": len(texts)}


# --------------------------------------------------------------------------- the section


def length_matched_subset(lengths: Sequence[int], n: int) -> np.ndarray:
    """``n`` indices spread evenly over the length-sorted texts (same length distribution)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    pick = np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int)
    return np.sort(order[np.unique(pick)])


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Relative difference of two activation sets, per token row (scale = the row's max |value|)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    scale = np.abs(b).max(axis=1, keepdims=True) + 1e-6
    rel = np.abs(a - b) / scale
    return {"max_rel": float(rel.max()), "median_row_max_rel": float(np.median(rel.max(axis=1))),
            "fp16_tolerance_ok": bool((np.abs(a - b) <= 2e-3 * scale + 1e-3).all())}


def roofline_seconds(forward: float, encode: float, model_dtype: str, sae_dtype: str, peak: dict[str, Any]) -> float:
    """Time the pipeline's matmul work would take at the measured peak of the dtype each part runs in."""
    return forward / (peak[model_dtype]["gflops"] * 1e9) + encode / (peak[sae_dtype]["gflops"] * 1e9)


def refraction(res: dict[str, Any], peak: dict[str, Any]) -> None:
    """(Re)compute roofline fractions and the FLOP-bound speedup ceiling against ``peak``.

    Fraction = (time the FLOPs need at the roofline of their dtype) / (time taken): the forward in
    the model's dtype, the SAE encode in the SAE's (float32), the whole pipeline's wall time.
    Where a spot peak was measured before each run of (a), each run is also paired with its own
    (``paired_roofline_fraction``, the median over runs): a check on drift, not the target.
    """
    runs = [res["mosaic"]] + ([res["float32_option"]] if "float32_option" in res else [])
    for a in runs:
        f = a["flops"]
        a["roofline_s"] = roofline_seconds(f["total"], f["sae_encode"], a["dtype"], a["sae_dtype"], peak)
        a["roofline_fraction"] = a["roofline_s"] / a["median_s"]
        a["forward_only_roofline_fraction"] = f["total"] / (peak[a["dtype"]]["gflops"] * 1e9) / a["forward_s_median"]
        if a.get("spot_peaks"):
            shares = [roofline_seconds(f["total"], f["sae_encode"], a["dtype"], a["sae_dtype"], p) / sec
                      for p, sec in zip(a["spot_peaks"], a["seconds"])]
            a["paired_roofline_fractions"] = shares
            a["paired_roofline_fraction"] = median(shares)
    a = res["mosaic"]
    # If (a) ran at 100% of its roofline while (b) kept its measured rate, the speedup would be:
    res["speedup_ceiling"] = a["median_s"] / a["roofline_s"] * res["speedup"]


def run(loaded: Any, sae: Any, texts: Sequence[str], layer: int, *, max_length: int, batch_tokens: int,
        repeats: int, seed_texts: int, peak: dict[str, Any], workdir: Path | None = None,
        loaded_fp32: Any | None = None, sweep: Sequence[int] = (),
        spot: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measure (a) in the default dtype and (b) in float32 [and (a) in float32, and a batch_tokens sweep].

    ``spot`` (optional) measures the matmul peak again; it runs right before each timed run of (a).
    ``loaded`` is the model as mosaic loads it by default (``dtype: auto``: bfloat16 where the CPU has
    native bf16, else float32); ``loaded_fp32`` the float32 model the seed loop runs (the seed tool's
    default), also used for the float32 option of (a) and the accuracy comparison. The SAE stays
    float32 in every run (its encoder loses too much in bf16: inputs with large norms cancel).
    """
    from mosaic_dag.lm.extract import tokenize

    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-bench-")) if own_tmp else Path(workdir)
    seed_model = loaded_fp32 if loaded_fp32 is not None else loaded
    try:
        ids, cut = tokenize(loaded.tokenizer, texts, max_length)
        lengths = [len(x) for x in ids]
        d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
        sae_dtype = dtype_name(sae.W_enc.dtype)

        # (a) mosaic over all texts and (b) the seed loop over a length-matched subset (it is slow: the
        # LM head runs on every token), interleaved repeat by repeat so that both see the same
        # background load; untimed warm-up calls first.
        sub = length_matched_subset(lengths, seed_texts)
        sub_texts = [texts[i] for i in sub]
        mosaic_features(loaded, sae, texts[: max(1, len(texts) // 8)], layer, max_length=max_length,
                        batch_tokens=batch_tokens, workdir=workdir)
        seed_loop_features(seed_model, sae, sub_texts[:2], layer, max_length=max_length)
        runs: list[dict[str, Any]] = []
        times_a: list[float] = []
        times_b: list[float] = []
        spots: list[dict[str, Any]] = []
        for _ in range(repeats):
            if spot is not None:
                spots.append(spot())
            sec, Xa, info_a = _timed_features(loaded, sae, texts, layer, max_length=max_length,
                                              batch_tokens=batch_tokens, workdir=workdir)
            times_a.append(sec)
            runs.append(info_a)
            t0 = time.perf_counter()
            Xb, info_b = seed_loop_features(seed_model, sae, sub_texts, layer, max_length=max_length)
            times_b.append(time.perf_counter() - t0)

        fwd = forward_flops(loaded, layer, lengths)
        enc = sae_flops(d_in, d_sae, info_a["real_tokens"])
        res: dict[str, Any] = {
            "texts": len(texts), "tokens": info_a["tokens"], "real_tokens": info_a["real_tokens"],
            "truncated_texts": cut, "mean_tokens_per_text": float(np.mean(lengths)), "layer": layer,
            "max_length": max_length, "batch_tokens": batch_tokens, "d_sae": d_sae, "repeats": repeats,
            "mosaic": _summary(times_a, runs, info_a["tokens"], fwd, enc, dtype_name(loaded.dtype), sae_dtype),
        }
        if spots:
            res["mosaic"]["spot_peaks"] = spots
        sec_b = median(times_b)
        sub_tokens = int(sum(lengths[i] for i in sub))
        if info_b["tokens"] != sub_tokens:
            raise AssertionError(f"token counts differ: seed loop {info_b['tokens']} vs mosaic tokenization {sub_tokens}")
        full = forward_flops(seed_model, None, [lengths[i] for i in sub], lm_head=True)
        enc_b = sae_flops(d_in, d_sae, info_b["tokens"])
        res["seed_loop"] = {
            "texts": len(sub), "tokens": info_b["tokens"], "dtype": dtype_name(seed_model.dtype), "seconds": times_b,
            "median_s": sec_b, "tokens_per_s": info_b["tokens"] / sec_b, "forward_calls": info_b["forward_calls"],
            "flops": {**full, "sae_encode": enc_b, "pipeline_total": full["total"] + enc_b},
            "achieved_gflops": (full["total"] + enc_b) / sec_b / 1e9,
        }
        res["speedup"] = res["mosaic"]["tokens_per_s"] / res["seed_loop"]["tokens_per_s"]
        res["flop_ratio_seed_over_mosaic_per_token"] = (
            (full["total"] + enc_b) / info_b["tokens"]) / ((fwd["total"] + enc) / info_a["tokens"])
        # Same features? (fp16 cache + fp16-rounded codes, and bf16 activations by default, vs an fp32
        # dense path; latents near the TopK boundary may swap, so a small relative difference is expected.)
        Xa_sub = Xa[sub]
        diff = np.linalg.norm(Xa_sub.toarray() - Xb) / max(np.linalg.norm(Xb), 1e-12)
        res["agreement"] = {"relative_frobenius_diff": float(diff),
                            "active_latents_per_text_mosaic": float(Xa_sub.getnnz(axis=1).mean()),
                            "active_latents_per_text_seed": float((Xb != 0).sum(axis=1).mean())}

        if loaded_fp32 is not None and dtype_name(loaded.dtype) != "float32":
            res["float32_option"] = _fp32_option(loaded, loaded_fp32, sae, texts, layer, max_length=max_length,
                                                 batch_tokens=batch_tokens, repeats=repeats, workdir=workdir,
                                                 Xa=Xa, fwd=fwd, enc=enc, seed_tps=res["seed_loop"]["tokens_per_s"])
        refraction(res, peak)
        if sweep:
            res["batch_tokens_sweep"] = _sweep(loaded, sae, texts, layer, max_length=max_length, workdir=workdir,
                                               values=sweep)
        return res
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _timed_features(loaded: Any, sae: Any, texts: Sequence[str], layer: int, **kwargs: Any
                    ) -> tuple[float, sp.csr_matrix, dict[str, Any]]:
    """Wall seconds of one ``mosaic_features`` call, and its result."""
    t0 = time.perf_counter()
    X, info = mosaic_features(loaded, sae, texts, layer, **kwargs)
    return time.perf_counter() - t0, X, info


def _summary(times: list[float], runs: list[dict[str, Any]], tokens: int, fwd: dict[str, float], enc: float,
             dtype: str, sae_dtype: str) -> dict[str, Any]:
    sec = median(times)
    fwd_s = median([r["forward_s"] for r in runs])
    return {
        "dtype": dtype, "sae_dtype": sae_dtype, "seconds": times, "median_s": sec, "tokens_per_s": tokens / sec,
        "batches": runs[-1]["batches"], "forward_calls": runs[-1]["forward_calls"],
        "forward_s_median": fwd_s, "encode_pool_s_median": median([r["encode_pool_s"] for r in runs]),
        "flops": {**fwd, "sae_encode": enc, "pipeline_total": fwd["total"] + enc},
        "achieved_gflops": (fwd["total"] + enc) / sec / 1e9,
        "forward_only_gflops": fwd["total"] / fwd_s / 1e9,
    }


def _fp32_option(loaded: Any, loaded_fp32: Any, sae: Any, texts: Sequence[str], layer: int, *, max_length: int,
                 batch_tokens: int, repeats: int, workdir: Path, Xa: sp.csr_matrix, fwd: dict[str, float],
                 enc: float, seed_tps: float) -> dict[str, Any]:
    """(a) again with ``dtype: float32``, and how far the default dtype's activations and features are from it."""
    from mosaic_dag.lm.extract import HiddenCache, extract_to_cache

    mosaic_features(loaded_fp32, sae, texts[: max(1, len(texts) // 8)], layer, max_length=max_length,
                    batch_tokens=batch_tokens, workdir=workdir)
    times, runs, X32 = [], [], None
    for _ in range(repeats):
        sec, X32, info = _timed_features(loaded_fp32, sae, texts, layer, max_length=max_length,
                                         batch_tokens=batch_tokens, workdir=workdir)
        times.append(sec)
        runs.append(info)
    out = _summary(times, runs, runs[-1]["tokens"], fwd, enc, "float32", dtype_name(sae.W_enc.dtype))
    out["speedup"] = out["tokens_per_s"] / seed_tps
    # Activation parity on a sample of texts: default-dtype cache vs fp32 cache, real tokens only.
    sample = list(texts[:32])
    got = {}
    for name, model in (("fp32", loaded_fp32), ("default", loaded)):
        folder = workdir / f"parity-{name}"
        extract_to_cache(model, sample, [layer], {layer: folder}, max_length=max_length, batch_tokens=batch_tokens)
        shard = HiddenCache(folder).load_all()
        got[name] = shard.acts[shard.real_mask].astype(np.float32)
        shutil.rmtree(folder, ignore_errors=True)
    ref = X32.toarray()
    out["default_vs_fp32"] = {
        "activation_parity": parity(got["default"], got["fp32"]),
        "pooled_feature_relative_diff": float(np.linalg.norm(Xa.toarray() - ref) / max(np.linalg.norm(ref), 1e-12)),
    }
    return out


def _sweep(loaded: Any, sae: Any, texts: Sequence[str], layer: int, *, max_length: int, workdir: Path,
           values: Sequence[int]) -> list[dict[str, Any]]:
    """One timed pass of the forward alone per batch_tokens value (after the runs above, so warm)."""
    from mosaic_dag.lm.extract import extract_to_cache

    out = []
    for bt in values:
        folder = workdir / f"sweep-{bt}"
        stats = extract_to_cache(loaded, texts, [layer], {layer: folder}, max_length=max_length, batch_tokens=bt)
        shutil.rmtree(folder, ignore_errors=True)
        out.append({"batch_tokens": bt, "batches": stats.batches, "forward_s": stats.seconds,
                    "tokens_per_s": stats.tokens / stats.seconds})
    return out
