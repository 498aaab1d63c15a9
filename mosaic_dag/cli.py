"""The ``mosaic`` command: run the demo or any config, sync partitions, open the UI.

Failures print one line (what is wrong and the fix) and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from mosaic_dag.errors import MosaicError


def _root_cause(err: BaseException) -> BaseException:
    """Dagster wraps step failures; the user needs the innermost mosaic error."""
    seen = set()
    cur: BaseException | None = err
    best: BaseException = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MosaicError):
            best = cur
        user = getattr(cur, "user_exception", None)
        cur = user or cur.__cause__ or cur.__context__
    return best


def _print_summary(summary) -> None:  # type: ignore[no-untyped-def]
    cfg = summary.config
    hits = sum(1 for s in summary.steps if s.asset == "hidden_states" and s.metadata.get("cache_hit"))
    n_hidden = sum(1 for s in summary.steps if s.asset == "hidden_states")
    print(f"\nhidden states: {n_hidden} partitions, {hits} cache hits, {summary.forward_calls()} LM forward calls")
    print(f"results:   {cfg.data_path}   (table: mosaic results{' --config FILE' if cfg.name != 'demo' else ''})")
    if summary.report:
        print(f"report:    {summary.report}")
    print(f"dagster:   DAGSTER_HOME={summary.dagster_home}  (see it: mosaic ui, or dagster dev -w workspace.yaml)")
    print(f"mlflow:    {summary.tracking_uri}  (mlflow ui --backend-store-uri {summary.tracking_uri})")


QUIET_ENV = {  # every progress bar the libraries we run draw: tqdm itself, the Hugging Face hub/transformers, datasets
    "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def check_models(cfg, config_name: str) -> None:  # type: ignore[no-untyped-def]
    """What can be checked about each model without weights or a download: its folder, config.json and
    block count (so a layer out of range fails here, before any compute, naming the key)."""
    from mosaic_dag.errors import ConfigError
    from mosaic_dag.lm.models import check_remote_code, known_blocks
    from mosaic_dag.paths import models_dir

    for i, m in enumerate(cfg.models):
        check_remote_code(m)
        n = known_blocks(m, models_dir())
        bad = [layer for layer in m.layers if n is not None and layer >= n]
        if bad:
            raise ConfigError(f"{config_name}: models.{i}.layers: layers {bad} out of range for model {m.name!r} with {n} blocks; "
                              f"use 0..{n - 1} (resid_post of block L)")
def _print_comparisons(cfg, table) -> None:  # type: ignore[no-untyped-def]
    from mosaic_dag.report.build import comparisons_table

    comp = comparisons_table(cfg, table)
    comp = comp[comp["scope"] != "partition"]
    if len(comp):
        print("\nSAE vs hidden / TF-IDF (paired on identical test rows, bootstrap 95% interval):\n")
        for _, r in comp.iterrows():
            where = "overall" if r["scope"] == "overall" else f"{r['dataset']}.{r['language']}"
            print(f"  {where:<24} {r['comparison']:<11} {r['verdict']:<14} {r['diff']:+.3f} "
                  f"[{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]  SAE wins {r['sae_win_share']:.0%}")


def cmd_run(args: argparse.Namespace) -> int:
    from mosaic_dag.config import load_config
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.evaluation.selection import best_rows
    from mosaic_dag.runner import run_experiment
    from mosaic_dag.tables import markdown_table

    check_models(load_config(args.config), args.config or "demo.yaml")
    summary = run_experiment(args.config, progress=not args.quiet, workers=getattr(args, "workers", None))
    table = results_table(summary.config)
    if len(table):
        cols = ["model", "layer", "sae", "dataset", "language", "features", "pooling", "analyzer", "threshold", "top_n",
                "classifier", "k", "validation_macro_f1", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "n_test"]
        print("\nselected probe per feature source (chosen on validation; test macro-F1 on the same held-out rows):\n")
        in_language = table[table["train_language"] == table["test_language"]]
        print(markdown_table(best_rows(in_language)[cols], max_rows=200))
        _print_comparisons(summary.config, table)
        n_cross = int((table["train_language"] != table["test_language"]).sum())
        if n_cross:
            print(f"\n+ {n_cross} cross-lingual transfer rows (mosaic results, and the report's heatmaps)")
    _print_summary(summary)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from mosaic_dag.config import load_config
    from mosaic_dag.errors import MosaicError
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.tables import markdown_table

    cfg = load_config(args.config)
    table = results_table(cfg, every=args.all)
    if table.empty:
        which = "" if args.all else " for this config's partitions (--all lists every config's)"
        raise MosaicError(f"no results under {cfg.data_path / 'results'}{which}; run `mosaic demo` or `mosaic run --config` first")
    if args.format == "csv":
        table.to_csv(sys.stdout, index=False)
    elif args.format == "markdown":
        print(markdown_table(table, max_rows=len(table)))
    else:
        out = Path(args.output or "results.parquet")
        table.to_parquet(out, index=False)
        print(f"wrote {len(table)} rows to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """(Re)build the report from the stored results of the config's partitions; print the HTML page's path."""
    from mosaic_dag.report.build import build_report
    from mosaic_dag.config import load_config
    from mosaic_dag.evaluation.results import results_table

    cfg = load_config(args.config)
    if results_table(cfg).empty:
        raise MosaicError(f"no results under {cfg.data_path / 'results'} for this config's partitions; run "
                          f"`mosaic {'demo' if args.config is None else 'run --config ' + args.config}` first")
    rep = build_report(cfg)
    print(rep.html)
    return 0


def cmd_partitions(args: argparse.Namespace) -> int:
    from mosaic_dag.config import load_config
    from mosaic_dag.runner import dagster_home, open_instance, register_partitions

    cfg = load_config(args.config)
    new_t, new_d = register_partitions(open_instance(dagster_home()), cfg)
    print(f"added {len(new_t)} target and {len(new_d)} dataset partitions")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mosaic_dag.config import load_config
    from mosaic_dag.keys import dataset_keys, targets

    cfg = load_config(args.config)
    check_models(cfg, args.config or "demo.yaml")
    print(f"ok: {len(targets(cfg))} targets × {len(dataset_keys(cfg))} datasets")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from mosaic_dag.runner import dagster_home
    from resources.experiment import CONFIG_ENV

    home = dagster_home()
    workspace = home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: mosaic_dag.definitions\n"
        "      attribute: defs\n      location_name: mosaic\n"
    )
    env = dict(os.environ)
    if args.config:
        env[CONFIG_ENV] = str(Path(args.config).resolve())
    # this interpreter's dagster, so the UI runs the same installation as `mosaic` without an activated venv
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", args.host, "-p", str(args.port)]
    print("starting: dagster dev", " ".join(cmd[4:]))
    return subprocess.call(cmd, env=env)


class _Parser(argparse.ArgumentParser):
    """argparse that fails like every other mosaic error: one line, exit 1 (argparse's own is exit 2)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(1, f"mosaic: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mosaic", description="SAE features for classification and transfer (MOSAIC).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="run the embedded default experiment (bundled Gemma 3 270M, demo data)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_run, config=None)
    run = sub.add_parser("run", help="run the asset graph for a config file")
    run.add_argument("--config", required=True, help="experiment YAML (see README)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--workers", type=int, default=None,
                     help="independent partitions run this many at a time (default: the config's run.workers)")
    run.set_defaults(func=cmd_run)
    res = sub.add_parser("results", help="print the tidy results table of a config's runs")
    res.add_argument("--config", default=None, help="experiment YAML (default: the embedded demo)")
    res.add_argument("--format", choices=["csv", "parquet", "markdown"], default="markdown")
    res.add_argument("--output", default=None, help="file for --format parquet (default results.parquet)")
    res.add_argument("--all", action="store_true",
                     help="also list results that earlier configs left in the same data folder")
    res.set_defaults(func=cmd_results)
    rep = sub.add_parser("report", help="(re)build report/index.html + index.md from stored results; print its path")
    rep.add_argument("--config", default=None, help="experiment YAML (default: the embedded demo)")
    rep.set_defaults(func=cmd_report)
    validate = sub.add_parser("validate", help="check a config file and print its partitions")
    validate.add_argument("--config", default=None)
    validate.set_defaults(func=cmd_validate)
    part = sub.add_parser("partitions", help="register the config's dynamic partitions in $DAGSTER_HOME")
    part.add_argument("--config", default=None)
    part.set_defaults(func=cmd_partitions)
    ui = sub.add_parser("ui", help="start the Dagster UI on this project's instance")
    ui.add_argument("--config", default=None)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "quiet", False):
        os.environ.update(QUIET_ENV)  # before any library is imported: tqdm reads TQDM_* once, at import
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mosaic: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mosaic results | head`: the reader has what it wanted; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0
    except Exception as err:  # noqa: BLE001 - the CLI turns every failure into one line
        root = _root_cause(err)
        msg = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        if not isinstance(root, MosaicError):
            msg = f"{type(root).__name__}: {msg}"
        print(f"mosaic: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
