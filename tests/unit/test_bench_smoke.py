"""Smoke test of the benchmark (bench/): every section's code path runs on the tiny model, and the
counts it reports are right. Nothing here looks at timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run as bench_run
from bench.common import count_densify


def test_count_densify_sees_big_toarray_only():
    big = sp.random(2048, 2048, density=1e-3, format="csr", dtype=np.float32, random_state=0)
    small = sp.csr_matrix(np.eye(3, dtype=np.float32))
    row = sp.random(1, 1 << 21, density=1e-5, format="csr", dtype=np.float32, random_state=0)
    with count_densify(min_elements=1 << 20) as c:
        small.toarray()
        big.toarray()
        big.tocoo().todense()
        row.toarray()  # one row of width size: big, and counted as a vector
        (big @ big.T).tocsr()  # sparse products stay sparse: not counted
    assert (c["calls"], c["big_calls"], c["big_vectors"]) == (4, 3, 1)
    assert sum(c["where"].values()) == 3 and all("test_bench_smoke.py" in site for site in c["where"])  # the asking line
    big.toarray()  # restored outside the context
    assert c["calls"] == 4


def test_bench_runs_end_to_end_on_tiny_model(tiny_model_dir: Path, tmp_path: Path):
    from mosaic_dag.lm.extract import tokenize

    out = tmp_path / "results"
    args = [
        "--model-id", str(tiny_model_dir), "--layer", "2", "--synthetic-texts",
        "--texts", "24", "--max-length", "24", "--peak-max-dim", "1024", "--batch-tokens", "64", "--repeats", "1", "--seed-texts", "6",
        "--sae-width", "128", "--small-sae-width", "64", "--sae-training-tokens", "1000",
        "--sweep", "32", "128", "--cache-texts", "16", "--cache-max-length", "16",
        "--memory-sizes", "20", "60", "--memory-max-length", "8",
        "--probe-rows", "300", "--probe-widths", "2048", "--dense-widths",
        "--sae-train-texts", "40", "--sae-train-batches", "64", "--sae-train-threads", "1",
        "--sae-train-whole-tokens", "0", "--wide-texts", "30", "--wide-widths", "512",
        "--out", str(out), "--workdir", str(tmp_path),
    ]
    res = bench_run.main(args)

    # 1: both paths saw the same tokens; one forward per batch; same pooled features (up to fp16).
    loaded = bench_run.load(str(tiny_model_dir), 2)
    texts = bench_run.synthetic_texts(24)
    ids, cut = tokenize(loaded.tokenizer, texts, 24)
    t = res["throughput"]
    assert t["texts"] == 24 and t["tokens"] == sum(len(x) for x in ids) and t["truncated_texts"] == cut
    assert t["mosaic"]["forward_calls"] == t["mosaic"]["batches"] >= 2
    assert t["seed_loop"]["texts"] == 6 and t["seed_loop"]["forward_calls"] == 6
    assert t["agreement"]["relative_frobenius_diff"] < 0.05
    assert t["mosaic"]["flops"]["linear_params"] == pytest.approx(
        3 * sum(m.weight.numel() for m in loaded.model.model.layers[0].modules() if hasattr(m, "weight") and m.weight.ndim == 2))
    assert [s["batch_tokens"] for s in t["batch_tokens_sweep"]] == [32, 128]
    a = t["mosaic"]
    assert a["dtype"] == res["model"]["default_dtype"] and a["sae_dtype"] == "float32"
    assert a["roofline_fraction"] == pytest.approx(a["roofline_s"] / a["median_s"])
    assert len(a["spot_peaks"]) == len(a["seconds"]) == len(a["paired_roofline_fractions"]) == 1  # --repeats 1
    for dtype in ("float32", "bfloat16"):  # the spot measurements count towards the (best-of) roofline
        assert res["peak"][dtype]["gflops"] >= a["spot_peaks"][0][dtype]["gflops"] > 0
    if a["dtype"] != "float32":  # machines with native bf16: the fp32 option and the accuracy check ran
        h = t["float32_option"]
        assert h["dtype"] == "float32" and h["tokens_per_s"] > 0
        assert h["default_vs_fp32"]["activation_parity"]["median_row_max_rel"] < 0.05

    # 5: the sparse step and sae-lens's stock step both ran, on the same activations, and the FLOPs add up.
    st = res["sae_train"]
    (row,) = st["rows"]
    assert row["batch"] == 64 and row["threads"] == 1 and row["speedup_vs_stock"] > 0
    assert row["flops_per_step"] == pytest.approx(2 * 64 * st["d_in"] * 4096 + 8 * 64 * 32 * st["d_in"])
    assert row["roofline_fraction"] == pytest.approx(row["achieved_gflops"] / st["peak"]["float32"]["gflops"])
    assert row["share_of_adjacent_matmul"] > 0 and row["encoder_matmul_gflops"] > 0
    # 6: one subprocess per width, its codes never densified, its peak above the weights reported.
    w = res["wide_sae"]["widths"]["512"]
    assert w["texts"] == 30 and w["big_densifications"] == 0 and w["mean_l0"] > 0
    assert 0 < w["fit_active_columns"] <= 512
    assert w["peak_above_weights_mib"] == pytest.approx(w["peak_rss_work_mib"] - w["sae_weights_mib"])
    assert {v["target"][:1] for v in res["verdicts"]} >= {"5", "6"}

    # 2: the second SAE on the cached layer runs no LM forward and loads no model.
    c = res["cache_reuse"]
    assert not c["first"]["cache_hit"] and c["first"]["forward_calls"] >= 1
    assert c["second"]["cache_hit"] and c["second"]["forward_calls"] == 0 and c["second"]["model_loads"] == 0
    assert c["second"]["rows"] == 16 and c["second"]["d_sae"] == 128 and c["first"]["d_sae"] == 64

    # 3: each size ran in its own process over the right number of texts.
    m = res["memory"]
    assert (m["small"]["texts"], m["big"]["texts"]) == (20, 60)
    assert m["small"]["pooled_shape"] == [20, 64] and m["big"]["pooled_shape"] == [60, 64]
    assert m["big"]["tokens"] > m["small"]["tokens"] > 0
    assert m["small"]["work_peak_rss_mib"] > 0 and m["ratio"] > 0

    # 4: the sparse fit never densified a big matrix.
    p = res["probes"]["sparse"]["2048"]
    assert p["rows"] == 300 and p["big_toarray_calls"] == 0 and not p["timed_out"]
    assert res["probes"]["dense"] == {}

    # Report: JSON written, one verdict per target, a table.
    saved = json.loads((out / "latest.json").read_text())
    assert {v["target"][0] for v in saved["verdicts"]} == {"1", "2", "3", "4", "5", "6"}
    targets = [v for v in saved["verdicts"] if "(reference)" not in v["target"]]
    assert len(targets) == 7 and all(isinstance(v["pass"], bool) for v in targets)
    assert all(v["pass"] is None for v in saved["verdicts"] if v not in targets)  # fp32 option: shown, not judged
    assert "| target | measured | goal | result |" in (out / "latest.md").read_text()


def test_end_to_end_table_counts_stage_flops_against_the_roofline():
    from bench.end_to_end import BLOCK_LINEAR_WEIGHTS, inside_stages, stage_flops, stages, table_rows
    from mosaic_dag.sae.step import step_flops

    steps = [{"asset": "dataset", "partition": "d.en", "seconds": 10.0, "metadata": {}},
             {"asset": "hidden_states", "partition": "d.en", "seconds": 10.0, "metadata": {"tokens": 1000}},
             {"asset": "sae", "partition": "m.L6.s", "seconds": 4.0, "metadata": {}},
             {"asset": "sae_codes", "partition": "m.L6.s|d.en", "seconds": 2.0, "metadata": {"tokens": 1000}},
             {"asset": "probes", "partition": "m.L6.s|d.en", "seconds": 2.0, "step_seconds": 1.5,
              "metadata": {"seconds_logistic": 1.0, "seconds_tree": 0.25}}]
    run = {"wall_s": 17.0, "steps": steps}
    run["stages"] = stages(run)
    run["sum_of_steps_s"] = sum(x["seconds"] for x in run["stages"].values())
    assert run["stages"]["dataset+hidden_states"] == {"seconds": 10.0, "steps": 1, "tokens": 1000}
    r = {"runs": {"1": run}, "layers": [6, 12], "training_tokens": 2048,
         "peak": {"float32": {"gflops": 100.0}, "bfloat16": {"gflops": 200.0}},
         "machine": {"cpu_kind": {"auto_dtype": "bfloat16"}}}
    f = stage_flops(r, run)
    forward = 2.0 * BLOCK_LINEAR_WEIGHTS * 13 * 1000  # blocks 0..12, bf16 here
    assert f["dataset+hidden_states"]["flops"] == forward
    assert f["dataset+hidden_states"]["share"] == pytest.approx(forward / 200e9 / 10.0)
    assert f["sae"]["flops"] == pytest.approx(step_flops(1024, 640, 4096, nnz=32 * 1024)["total"] * 2)
    assert f["sae_codes+probes"]["roofline_s"] == pytest.approx(2.0 * 640 * 4096 * 1000 / 100e9)
    assert "report" not in f and any("TFLOP counted" in v for _, v in table_rows(r))
    assert inside_stages(run) == {"asset probes": 1.5, "probes: logistic": 1.0, "probes: tree": 0.25}
    r["machine"]["cpu_kind"]["auto_dtype"] = "float32"  # a CPU without native bf16: the forward against fp32
    assert stage_flops(r, run)["dataset+hidden_states"]["share"] == pytest.approx(forward / 100e9 / 10.0)
