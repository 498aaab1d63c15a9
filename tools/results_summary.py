"""Print README's results table from finished runs: one row per task, the configurations selected on
validation (across layers and SAEs) and the paired SAE − hidden / SAE − TF-IDF test differences.

    python tools/results_summary.py examples/refusal.yaml examples/jailbreak.yaml …

Reads only what `mosaic run --config X` stored under each config's data_dir; computes nothing new.
"""

from __future__ import annotations

import sys

import pandas as pd

from mosaic_dag.report.build import comparisons_table
from mosaic_dag.config import load_config
from mosaic_dag.evaluation.results import results_table
from mosaic_dag.evaluation.selection import best_rows


def _probe(row: pd.Series) -> str:
    parts = [f"L{int(row['layer'])}"]
    for key in ("pooling", "analyzer", "threshold", "top_n", "classifier", "k"):
        value = row.get(key)
        if value is not None and not pd.isna(value) and value != "":
            parts.append(f"{key}={value:g}" if isinstance(value, float) else str(value))
    return " ".join(parts)


def _diff(c: pd.Series) -> str:
    return f"{c['diff']:+.3f} [{c['diff_ci_low']:+.3f}, {c['diff_ci_high']:+.3f}] {c['verdict']}"


def main(paths: list[str]) -> int:
    print("| config | task | n test | SAE (selected) | hidden | TF-IDF | SAE − hidden [95% CI] | SAE − TF-IDF [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        cfg = load_config(path)
        table = results_table(cfg)
        table = table[table["train_language"] == table["test_language"]]
        chosen = best_rows(table)
        comps = comparisons_table(cfg, table)
        tasks = comps[comps["scope"] == "task"]
        for (dataset, language), part in chosen.groupby(["dataset", "language"], sort=True):
            by = {r["features"]: r for _, r in part.iterrows()}
            if "sae" not in by:
                continue
            mine = tasks[(tasks["dataset"] == dataset) & (tasks["language"] == language)]
            pair = {r["comparison"]: r for _, r in mine.iterrows()}
            cells = [f"`{path.rsplit('/', 1)[-1]}`", f"{dataset}.{language}", str(int(by["sae"]["n_test"])),
                     f"{by['sae']['macro_f1']:.3f} ({_probe(by['sae'])})"]
            cells += [f"{by[s]['macro_f1']:.3f}" if s in by else "" for s in ("hidden", "tfidf")]
            cells += [_diff(pair[c]) if c in pair else "" for c in ("sae-hidden", "sae-tfidf")]
            print("| " + " | ".join(cells) + " |")
        total = {r["comparison"]: r for _, r in comps[comps["scope"] == "overall"].iterrows()}
        if chosen.groupby(["dataset", "language"]).ngroups > 1 and total:
            cells = [f"`{path.rsplit('/', 1)[-1]}`", "**overall** (mean over tasks)", "", "", "", ""]
            cells += [_diff(total[c]) if c in total else "" for c in ("sae-hidden", "sae-tfidf")]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
