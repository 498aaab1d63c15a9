"""Sections 7 and 8: a whole experiment through ``mosaic run``, per stage, and with 1 vs 2 worker processes.

The experiment (written to a temporary config): tweet_sentiment_multilingual from ``../shared/data``,
5 languages (en, fr, de, es, it) × ``--rows`` texts each (1,000 for the issue's experiment), the
bundled Gemma 3 270M at layers 6 and 12, one local BatchTopK SAE per layer (width 4096, k 32, trained
on the partitions' train tokens), the default probe sweep, transfer and report. Each run is a fresh
subprocess with its own data folder and Dagster instance (``run_experiment``), so nothing is reused.

Per stage: the wall seconds of every materialised step (Dagster's own timings) summed over partitions;
the sum of the steps against the whole run's wall time is what orchestration costs (process starts,
Dagster runs, event storage). FLOPs are counted for the stages where they are countable (forward,
SAE training, encode: ``stage_flops``) against the roofline measured at the start. Section 7 runs
the same experiment with ``--workers 1`` and ``--workers 2`` and reports the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, SHARED_DATA, MissingData, machine, peak_matmul_gflops, write_json

LANGS = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "it": "italian"}
WIDTH, K = 4096, 32  # the local BatchTopK SAE per layer


def config(rows: int, data_dir: Path, training_tokens: int, layers: tuple[int, ...] = (6, 12),
           quality_floors: bool = True) -> dict[str, Any]:
    root = SHARED_DATA / "tweet_sentiment_multilingual"
    if not (root / "english" / "train_text.txt").is_file():
        raise MissingData(f"{root} is absent: the end-to-end benchmark needs ../shared/data")
    return {
        "name": "bench-e2e",
        # a scaled-down run trains its SAE on too few tokens to meet the floors; the timing is still of interest
        **({} if quality_floors else {"sae_quality": {"enabled": False}}),
        "data_dir": str(data_dir),
        "models": [{"name": "gemma-3-270m", "id": "bundled:gemma-3-270m", "layers": list(layers), "max_length": 64,
                    "saes": [{"origin": "train", "name": "local-btk4k", "architecture": "batchtopk", "width": WIDTH,
                              "k": K, "training_tokens": training_tokens}]}],
        "datasets": [{"name": "sentiment", "language": None, "max_rows": rows,
                      "label_names": {0: "negative", 1: "neutral", 2: "positive"},
                      "paths": {k: str(root / v) for k, v in LANGS.items()}}],
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One experiment run in this process; per-step records as JSON."""
    from mosaic_dag.runner import run_experiment

    t0 = time.perf_counter()
    summary = run_experiment(args.config, progress=False, echo=lambda *_: None, workers=args.workers)
    wall = time.perf_counter() - t0
    steps = [{"asset": s.asset, "partition": s.partition, "seconds": s.seconds, "step_seconds": s.step_seconds,
              "metadata": {k: v for k, v in s.metadata.items() if isinstance(v, (int, float, str)) and len(str(v)) < 200}}
             for s in summary.steps]
    return {"wall_s": wall, "steps": steps, "workers": args.workers}


def one_run(rows: int, workers: int, training_tokens: int, workdir: Path, timeout: float,
            quality_floors: bool = True) -> dict[str, Any]:
    cfg_path = workdir / f"e2e-w{workers}.yaml"
    data = workdir / f"data-w{workers}"
    cfg_path.write_text(yaml.safe_dump(config(rows, data, training_tokens, quality_floors=quality_floors)))
    out = workdir / f"result-w{workers}.json"
    env = {**os.environ, "DAGSTER_HOME": str(workdir / f"dagster-w{workers}"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow-w{workers}.db"}
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.end_to_end", "--child", "--config", str(cfg_path),
                           "--workers", str(workers), "--result", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"end-to-end run (workers {workers}) failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    res = json.loads(out.read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def stages(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Seconds and run count per stage, summed over partitions.

    The runner gives every asset materialised in one Dagster run that run's wall seconds, so a stage
    here is one run's set of assets (e.g. ``sae_codes+pooled_features+probes+conditions``), counted
    once per run: per-asset seconds inside a run are not recorded.
    """
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"seconds": 0.0, "steps": 0, "tokens": 0})
    runs: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for s in res["steps"]:
        runs[(s["partition"], s["seconds"])].append(s)
    for (_, seconds), recs in runs.items():
        x = out["+".join(dict.fromkeys(r["asset"] for r in recs))]
        x["seconds"] += seconds
        x["steps"] += 1
        x["tokens"] += sum(int(r["metadata"].get("tokens", 0) or 0) for r in recs)
    return dict(out)


def inside_stages(res: dict[str, Any]) -> dict[str, float]:
    """Seconds summed over partitions of each asset's own step (Dagster's step events), and of each probe
    family inside the probes step (its ``seconds_<family>`` metadata)."""
    out: dict[str, float] = defaultdict(float)
    for s in res["steps"]:
        own = s.get("step_seconds")
        if isinstance(own, (int, float)) and own == own:  # not NaN
            out[f"asset {s['asset']}"] += own
        for key, value in s["metadata"].items():
            if s["asset"] == "probes" and key.startswith("seconds_") and isinstance(value, (int, float)):
                out[f"probes: {key.removeprefix('seconds_')}"] += value
    return dict(out)


def run(rows: int = 1000, workers: tuple[int, ...] = (1, 2), training_tokens: int = 200_000,
        timeout: float = 3600, quality_floors: bool = True, peak: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment once per worker count; ``peak``: the roofline for the stages' FLOP shares (measured
    here first when not given)."""
    from bench.common import load_average

    res: dict[str, Any] = {"rows_per_language": rows, "languages": list(LANGS), "layers": [6, 12],
                           "sae": f"local BatchTopK {WIDTH}, k {K}", "training_tokens": training_tokens, "runs": {},
                           "quality_floors": quality_floors, "machine": machine(),
                           "peak": peak or peak_matmul_gflops(3), "load_average_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="mosaic-e2e-") as tmp:
        for w in workers:
            print(f"[7/8] end-to-end, {rows} texts x {len(LANGS)} languages, workers {w} ...", flush=True)
            r = one_run(rows, w, training_tokens, Path(tmp), timeout, quality_floors)
            r["stages"] = stages(r)
            r["sum_of_steps_s"] = sum(x["seconds"] for x in r["stages"].values())
            res["runs"][str(w)] = r | {"n_steps": len(r["steps"])}
            print(f"[7/8] workers {w}: {r['wall_s']:.0f} s (steps sum {r['sum_of_steps_s']:.0f} s)", flush=True)
    res["load_average_end"] = load_average()  # how busy the machine was: the per-stage seconds depend on it
    if "1" in res["runs"] and "2" in res["runs"]:
        res["speedup_2_workers"] = res["runs"]["1"]["wall_s"] / res["runs"]["2"]["wall_s"]
    return res


# Gemma 3 270M: d_model 640; per block q 640x1024, k and v 640x256, o 1024x640, gate/up 640x2048, down 2048x640
D_MODEL, BLOCK_LINEAR_WEIGHTS = 640, 5_570_560


def stage_flops(r: dict[str, Any], run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Countable FLOPs per stage of one run, and its share of the roofline (``r["peak"]``) over that stage's seconds.

    Forward: 2 x the linear weights of blocks 0..12 per real token (attention, norms not counted); SAE
    training: ``step_flops`` per trained token, per SAE; codes: the encoder product 2 x d x width per
    token and layer (the probes in the same runs are not counted). The forward runs in the default
    dtype (bf16 where the CPU has it), the SAE in float32.
    """
    from mosaic_dag.sae.step import step_flops

    peak = r.get("peak")
    if not peak:
        return {}
    bf16 = r.get("machine", {}).get("cpu_kind", {}).get("auto_dtype") == "bfloat16"
    out: dict[str, dict[str, Any]] = {}
    for name, x in run["stages"].items():
        if name.startswith("dataset+hidden_states"):
            flops = 2.0 * BLOCK_LINEAR_WEIGHTS * (max(r["layers"]) + 1) * x["tokens"]
            rate = peak["bfloat16" if bf16 else "float32"]["gflops"]
        elif name == "sae":
            per = step_flops(1024, D_MODEL, WIDTH, nnz=K * 1024)["total"] / 1024
            flops, rate = per * r["training_tokens"] * x["steps"], peak["float32"]["gflops"]
        elif name.startswith("sae_codes"):
            flops, rate = 2.0 * D_MODEL * WIDTH * x["tokens"], peak["float32"]["gflops"]
        else:
            continue
        out[name] = {"flops": flops, "roofline_s": flops / rate / 1e9, "share": flops / rate / 1e9 / x["seconds"]}
    return out


def table_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    base = r["runs"].get("1") or next(iter(r["runs"].values()))
    counted = stage_flops(r, base)
    for name, x in sorted(base["stages"].items(), key=lambda kv: -kv[1]["seconds"]):
        f = counted.get(name)
        extra = (f"; {f['flops'] / 1e12:.2f} TFLOP counted, {f['roofline_s']:.1f} s at the roofline = "
                 f"{100 * f['share']:.0f}% of it" if f else "")
        rows.append((f"8 stage {name} ({x['steps']} runs)", f"{x['seconds']:.1f} s{extra}"))
    for name, seconds in sorted(inside_stages(base).items(), key=lambda kv: -kv[1]):
        rows.append((f"8 inside the runs, {name} (summed over partitions)", f"{seconds:.1f} s"))
    rows.append(("8 load average at start / end", f"{r.get('load_average_start')} / {r.get('load_average_end')}"))
    rows.append(("8 whole run vs sum of its steps (workers 1)",
                 f"{base['wall_s']:.0f} s vs {base['sum_of_steps_s']:.0f} s: orchestration {base['wall_s'] - base['sum_of_steps_s']:.0f} s"))
    for w, x in r["runs"].items():
        rows.append((f"7 wall time, {w} worker(s)", f"{x['wall_s']:.0f} s"))
    if "speedup_2_workers" in r:
        rows.append(("7 speed-up, 2 workers vs 1", f"{r['speedup_2_workers']:.2f}x"))
    return rows


def table_markdown(r: dict[str, Any]) -> str:
    return "\n".join(["| measurement | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table_rows(r)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--rows", type=int, default=1000, help="texts per language (1000: the issue's experiment)")
    p.add_argument("--training-tokens", type=int, default=200_000, help="SAE training tokens (the config default)")
    p.add_argument("--no-quality-floors", action="store_true",
                   help="turn the SAE quality floors off (a scaled-down run's SAE cannot meet them)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "end_to_end.json")
    p.add_argument("--table-from", type=Path, default=None,
                   help="print the table of a saved result (its JSON) with the roofline measured now, and run nothing")
    args = p.parse_args(argv)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        saved["peak"] = saved.get("peak") or peak_matmul_gflops(3)
        print(table_markdown(saved))
        return
    if args.child:
        Path(args.result).write_text(json.dumps(child(argparse.Namespace(config=args.config, workers=args.workers[0]))))
        return
    res = run(args.rows, tuple(args.workers), args.training_tokens, quality_floors=not args.no_quality_floors)
    md = table_markdown(res)
    res["table_markdown"] = md
    print(md)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
