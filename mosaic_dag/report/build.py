"""The report step: gathers the results table, transfer matrices, hard-condition curves, interventions,
paired comparisons and interpretation fragments of the config's own partitions and writes
``<data_dir>/report/index.{html,md}`` with its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.comparisons import COMPARISON_COLUMNS, comparison_frame, overall, paired_comparison
from mosaic_dag.evaluation.conditions import conditions_table
from mosaic_dag.evaluation.results import read_results_file, results_table
from mosaic_dag.evaluation.selection import best_rows
from mosaic_dag.evaluation.sweeps import SplitRows
from mosaic_dag.evaluation.transfer import transfer_matrices
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from mosaic_dag.paths import interpretation_file, predictions_file, predictions_root, report_dir
from mosaic_dag.probes.metrics import majority_baseline_f1

__all__ = ["build_report", "comparisons_table", "interpretation_files", "majority_baselines", "sae_labels"]


def majority_baselines(cfg: ExperimentConfig) -> dict[str, float]:
    """Majority-class test macro-F1 per 'dataset.language' whose dataset file is on disk (drawn in the figures)."""
    from mosaic_dag.paths import dataset_file

    out = {}
    for d in dataset_keys(cfg):
        path = dataset_file(cfg, d.dataset, d.language)
        if path.exists():
            frame = pd.read_parquet(path, columns=["label", "split"])
            r = SplitRows.of(frame)
            out[d.key] = majority_baseline_f1(r.y(np.concatenate([r.train, r.validation])), r.y(r.test))
    return out


def sae_labels(cfg: ExperimentConfig) -> dict[str, str]:
    """SAE name -> name with width and L0 target where the config knows them (trained SAEs)."""
    return {s.label: (f"{s.label} ({s.width}, k={s.k})" if s.origin == "train" else s.label)
            for m in cfg.models for s in m.saes}


def build_report(cfg: ExperimentConfig, results: list[Path] | None = None, transfer: list[Path] | None = None,
                 conditions: list[Path] | None = None, interventions: list[Path] | None = None) -> Any:
    """``<data_dir>/report/index.{html,md}`` + figures from the given result files (default: every one on disk)."""
    from mosaic_dag.provenance import provenance
    from mosaic_dag.report.markdown import write_report

    table = results_table(cfg, None if results is None else [p for p in results if Path(p).exists()])
    curves = conditions_table(cfg, conditions)
    matrices = transfer_matrices(cfg, transfer)
    extra = (f"Experiment `{cfg.name}`: {len(table)} probe rows, {len(matrices)} transfer matrices, "
             f"{len(curves)} hard-condition points. Data folder: `{cfg.data_path}`.\n")
    images = [d.name for d in cfg.datasets if d.modality == "image"]
    if images:
        extra += (f"\nImage datasets ({', '.join(images)}): TF-IDF has no words to read in an image, so image "
                  "partitions have SAE and hidden-state probes only; a transfer matrix with an `image` row/column "
                  "is text -> image transfer (class descriptions vs images).\n")
    tables = [read_results_file(p) for p in interventions or [] if Path(p).exists()]
    if any(len(t) for t in tables):
        from mosaic_dag.tables import markdown_table

        shown = pd.concat(tables, ignore_index=True)[["model", "layer", "sae", "dataset", "language", "probe", "class",
                                                      "latent", "weight", "probe_flip_share", "model_effect",
                                                      "model_metric", "verdict"]]
        extra += ("\n## Interventions: do the selected SAE probe's top latents matter?\n\n`probe_flip_share`: share of "
                  "test decisions that flip when the latent is removed from the pooled features; `model_effect`: change "
                  "of the model's output when it is removed at the SAE's layer (reconstruction + error term) — "
                  "`kl_last_token` (nats) or `abs_delta_logprob` of the labelled answer.\n\n"
                  + markdown_table(shown.round(4), max_rows=60) + "\n")
    comparisons = comparisons_table(cfg, table)
    fragments = [f.read_text(encoding="utf-8") for f in interpretation_files(cfg)]
    sections = ("<h2>What the SAE probes learned</h2><p class='note'>Per partition: the validation-selected SAE "
                "probe's top latents per class and the test texts that make them fire.</p>" + "".join(fragments)
                ) if fragments else ""
    if fragments:
        extra += "\nLatent interpretation (top latents, firing texts, decision trees): see index.html.\n"
    return write_report(report_dir(cfg), table, matrices or None,
                        curves if len(curves) else None, extra_md=extra, comparisons=comparisons,
                        title=f"MOSAIC report: {cfg.name}", baselines=majority_baselines(cfg),
                        sae_labels=sae_labels(cfg), provenance=provenance(cfg), sections_html=sections)


def interpretation_files(cfg: ExperimentConfig) -> list[Path]:
    """The latent-interpretation fragments the probes asset wrote for the config's own partitions."""
    files = [interpretation_file(cfg, t, d.dataset, d.language) for t in targets(cfg) for d in dataset_keys(cfg)]
    return [f for f in files if f.is_file()]


def _predictions_for(cfg: ExperimentConfig, row: pd.Series) -> pd.DataFrame | None:
    """The stored test predictions holding ``row``'s probe (hidden/TF-IDF rows: any SAE target of its layer)."""
    root = predictions_root(cfg)
    name = f"{'judge.' if row['features'] == 'judge' else ''}{row['dataset']}.{row['language']}.parquet"
    if row["sae"]:  # judge rows have no SAE: their file is found like the hidden/TF-IDF ones
        target = TargetKey(str(row["model"]), int(row["layer"]), str(row["sae"]))
        files = [predictions_file(cfg, target, str(row["dataset"]), str(row["language"]))]
    else:
        files = sorted(root.glob(f"{row['model']}.L{int(row['layer'])}.*/{name}")) if root.exists() else []
    for f in files:
        if f.exists():
            frame = pd.read_parquet(f)
            if row["probe"] in frame.columns:
                return frame[["id", "y_true", row["probe"]]].rename(columns={row["probe"]: "pred"})
    return None


def _pair(cfg: ExperimentConfig, sae_row: pd.Series, other_row: pd.Series) -> Any:
    a, b = _predictions_for(cfg, sae_row), _predictions_for(cfg, other_row)
    if a is None or b is None:
        return None
    joined = a.merge(b[["id", "pred"]], on="id", suffixes=("_sae", "_other"), how="inner")
    if len(joined) != len(a) or len(joined) != len(b):
        raise ValueError(f"{sae_row['probe']} vs {other_row['probe']}: scored on different test rows; cannot pair them")
    cls = cfg.classification
    return paired_comparison(f"sae-{other_row['features']}", joined["y_true"].to_numpy(),
                             (str(sae_row["probe"]), joined["pred_sae"].to_numpy()),
                             (str(other_row["probe"]), joined["pred_other"].to_numpy()), n_boot=cls.bootstrap, seed=cls.seed)


def comparisons_table(cfg: ExperimentConfig, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Paired SAE − hidden / SAE − TF-IDF of the validation-selected probes, at three scopes:

    ``partition`` (one model/layer/SAE × dataset.language), ``task`` (dataset.language, selected
    across layers and SAEs) and ``overall`` (mean over tasks).
    """
    table = results_table(cfg) if results is None else results
    if table.empty or "validation_macro_f1" not in table.columns:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    table = table[table["train_language"] == table["test_language"]]
    out: list[tuple[dict[str, Any], Any]] = []
    for (model, layer, sae, dataset, language), part in table[table["features"] == "sae"].groupby(
            ["model", "layer", "sae", "dataset", "language"], sort=True):
        scope = {"scope": "partition", "model": model, "layer": int(layer), "sae": sae, "dataset": dataset, "language": language}
        same = table[(table["model"] == model) & (table["layer"] == layer) & (table["dataset"] == dataset)
                     & (table["language"] == language)]
        sel = best_rows(part).iloc[0]
        for features in ("hidden", "tfidf", "judge"):
            other = same[same["features"] == features]
            if len(other):
                p = _pair(cfg, sel, best_rows(other).iloc[0])
                if p is not None:
                    out.append((scope, p))
    tasks = []
    chosen = best_rows(table)
    for (dataset, language), part in chosen.groupby(["dataset", "language"], sort=True):
        by_features = {r["features"]: r for _, r in part.iterrows()}
        if "sae" not in by_features:
            continue
        sae_row = by_features["sae"]
        for features in ("hidden", "tfidf", "judge"):
            if features in by_features:
                p = _pair(cfg, sae_row, by_features[features])
                if p is not None:
                    scope = {"scope": "task", "model": sae_row["model"], "layer": int(sae_row["layer"]),
                             "sae": sae_row["sae"], "dataset": dataset, "language": language}
                    out.append((scope, p))
                    tasks.append(p)
    for comparison in ("sae-hidden", "sae-tfidf", "sae-judge"):
        p = overall(comparison, tasks)
        if p is not None:
            out.append(({"scope": "overall"}, p))
    return comparison_frame(out)
