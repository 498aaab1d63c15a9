"""Cross-lingual transfer, hard conditions and the report, over the pooled features on disk.

    <data_dir>/results/<target>/transfer.<dataset>.parquet               off-diagonal rows of the results table
    <data_dir>/results/<target>/transfer-matrix.<dataset>.<features>.parquet
    <data_dir>/conditions/<target>/<dataset>.<language>.parquet          hard-condition curves
    <data_dir>/report/index.md + *.png
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.evaluation.sweeps import RESULT_COLUMNS, SplitRows, _typed, read_results_file, results_table
from mosaic_dag.features.pooled import PooledResult, feature_name, load_matrix
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.paths import (conditions_file, interpretation_file, predictions_file, predictions_root, report_dir,
                              results_root, task_cells_file, transfer_file, transfer_matrix_file)
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from mosaic_dag.data.step import read_frame
from mosaic_dag.features.pooling import binarize
from mosaic_dag.storage import write_parquet


def multilingual_datasets(cfg: ExperimentConfig) -> list[str]:
    return [d.name for d in cfg.datasets if len(cfg.dataset_languages(d.name)) >= 2]


@dataclass
class TransferOutcome:
    dataset: str
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)  # features -> train x test macro-F1
    rows: pd.DataFrame | None = None
    results_path: Path | None = None
    matrix_paths: list[Path] = field(default_factory=list)


def _feature_matrix(cfg: ExperimentConfig, pooled: PooledResult, source: str) -> Any:
    tc = cfg.transfer
    pooling = tc.pooling if not (source == "hidden" and tc.pooling == "topn_count") else "mean"
    top_n = tc.top_n if pooling == "topn_count" else None
    name = feature_name(source, pooling, top_n)
    if name not in pooled.files:
        from mosaic_dag.errors import ConfigError

        raise ConfigError(f"transfer.pooling {pooling!r} (top_n={top_n}) is not among classification.poolings/top_n; add it")
    X = load_matrix(pooled.files[name])
    if source == "sae" and tc.threshold is not None:
        X = binarize(X, tc.threshold, signed=pooled.signed)
    return X, pooling, top_n


def build_transfer(cfg: ExperimentConfig, target: TargetKey, dataset: str, pooled: dict[str, PooledHandle],
                   data: dict[str, DatasetHandle]) -> TransferOutcome:
    """Train on each language, test on every language: SAE, hidden and TF-IDF matrices.

    ``pooled`` and ``data``: the upstream handles of this dataset's partitions, by language."""
    from mosaic_dag.evaluation.transfer import Split, tfidf_transfer_matrix, transfer_matrix

    languages = cfg.dataset_languages(dataset)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    frames = {lang: read_frame(data[lang]) for lang in languages}
    matrices = {lang: PooledResult.of(pooled[lang]) for lang in languages}
    rows = {lang: SplitRows.of(frames[lang]) for lang in languages}
    out = TransferOutcome(dataset)
    records: list[pd.DataFrame] = []
    for source in ("sae", "hidden"):
        splits = {}
        pooling, top_n = "", None
        for lang in languages:
            X, pooling, top_n = _feature_matrix(cfg, matrices[lang], source)
            r = rows[lang]
            splits[lang] = Split(X[r.train], r.y(r.train), X[r.val], r.y(r.val), X[r.test], r.y(r.test),
                                 np.asarray(frames[lang]["id"].to_numpy()[r.test]))
        res = transfer_matrix(splits, seed=seed, n_boot=n_boot)
        out.matrices[source] = res.matrix
        records.append(res.long.assign(features=source, pooling=pooling, top_n=top_n,
                                       threshold=cfg.transfer.threshold if source == "sae" else math.nan,
                                       val_macro_f1=_val_scores(res)))
    from mosaic_dag.data.images import is_image_frame

    if not any(is_image_frame(f) for f in frames.values()):  # TF-IDF has no words to read in an image
        texts = {}
        for lang in languages:
            r, t = rows[lang], frames[lang]["text"].to_numpy()
            texts[lang] = (list(t[r.train]), r.y(r.train), list(t[r.val]), r.y(r.val), list(t[r.test]), r.y(r.test))
        res = tfidf_transfer_matrix(texts, cfg.transfer.tfidf, seed=seed, n_boot=n_boot)
        out.matrices["tfidf"] = res.matrix
        records.append(res.long.assign(features="tfidf", pooling=cfg.transfer.tfidf, top_n=None, threshold=math.nan,
                                       val_macro_f1=_val_scores(res)))
    long = pd.concat(records, ignore_index=True)
    long = long[long["train_language"] != long["test_language"]]  # the diagonal lives in the probes rows
    table = pd.DataFrame({
        "model": target.model, "layer": target.layer,
        "sae": np.where(long["features"] == "sae", target.sae, ""), "dataset": dataset,
        "language": long["test_language"], "features": long["features"], "pooling": long["pooling"],
        "threshold": long["threshold"], "top_n": long["top_n"], "classifier": "logistic", "k": None,
        "train_language": long["train_language"], "test_language": long["test_language"],
        "probe": long["features"] + "/" + long["pooling"].astype(str) + "/logistic",
        "val_macro_f1": long["val_macro_f1"], "selected": False, "macro_f1": long["macro_f1"], "macro_f1_ci_low": long["ci_low"], "macro_f1_ci_high": long["ci_high"],
        "accuracy": long["accuracy"], "auroc": long["auroc"], "n_train": long["n_train"], "n_test": long["n_test"],
        "vs_hidden": "", "vs_tfidf": "", "vs_judge": "", "cost": "", "mlflow_run_id": "",
    })[RESULT_COLUMNS]
    out.rows = _typed(table.reset_index(drop=True))
    return out


def task_partitions(cfg: ExperimentConfig, task: str) -> list[str]:
    """The dataset partitions (``<dataset>.<language>``) of every dataset that declares ``task``."""
    return [f"{d}.{lang}" for d in cfg.tasks[task] for lang in cfg.dataset_languages(d)]


def task_classes(cfg: ExperimentConfig, task: str) -> list[str]:
    return sorted(set(cfg.dataset(cfg.tasks[task][0]).task_classes.values()))  # type: ignore[union-attr]


@dataclass
class TaskOutcome:
    """Train-dataset × test-dataset matrices of one task (rows: train partition) and their cells with CIs."""

    task: str
    classes: list[str]
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)
    cells: pd.DataFrame | None = None
    matrix_paths: list[Path] = field(default_factory=list)
    cells_path: Path | None = None


def build_task_transfer(cfg: ExperimentConfig, target: TargetKey, task: str, pooled: dict[str, PooledHandle],
                        data: dict[str, DatasetHandle]) -> TaskOutcome:
    """Train on each dataset partition of ``task``, test on every one: SAE, hidden and TF-IDF.

    Labels go through each dataset's ``task_classes`` onto the task's common classes first, so every
    partition speaks one label space; features and settings are the cross-lingual ones (``transfer:``).
    ``pooled``/``data``: the upstream handles by dataset key."""
    from mosaic_dag.evaluation.transfer import Split, common_labels, tfidf_transfer_matrix, transfer_matrix

    keys = task_partitions(cfg, task)
    classes = task_classes(cfg, task)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    frames = {k: read_frame(data[k]).copy() for k in keys}
    for k, f in frames.items():
        mapping = cfg.dataset(k.split(".")[0]).task_classes or {}
        try:
            f["label"] = common_labels(f["label_name"].astype(str).tolist(), mapping, classes, f"dataset {k}")
        except ValueError as err:
            from mosaic_dag.errors import ConfigError

            raise ConfigError(str(err)) from None
    rows = {k: SplitRows.of(frames[k]) for k in keys}
    out = TaskOutcome(task, classes)
    cells: list[pd.DataFrame] = []
    for source in ("sae", "hidden"):
        splits = {}
        for k in keys:
            X, pooling, _ = _feature_matrix(cfg, PooledResult.of(pooled[k]), source)
            r = rows[k]
            splits[k] = Split(X[r.train], r.y(r.train), X[r.val], r.y(r.val), X[r.test], r.y(r.test),
                              np.asarray(frames[k]["id"].to_numpy()[r.test]))
        res = transfer_matrix(splits, seed=seed, n_boot=n_boot)
        out.matrices[source] = res.matrix
        cells.append(res.long.assign(features=source, pooling=pooling))
    texts = {}
    for k in keys:
        r, t = rows[k], frames[k]["text"].to_numpy()
        texts[k] = (list(t[r.train]), r.y(r.train), list(t[r.val]), r.y(r.val), list(t[r.test]), r.y(r.test))
    res = tfidf_transfer_matrix(texts, cfg.transfer.tfidf, seed=seed, n_boot=n_boot,
                                languages={k: k.split(".", 1)[1] for k in keys})
    out.matrices["tfidf"] = res.matrix
    cells.append(res.long.assign(features="tfidf", pooling=cfg.transfer.tfidf))
    long = pd.concat(cells, ignore_index=True).rename(columns={"train_language": "train_partition",
                                                                "test_language": "test_partition"})
    out.cells = long.assign(model=target.model, layer=target.layer, sae=np.where(long["features"] == "sae", target.sae, ""),
                            task=task)
    for m in out.matrices.values():
        m.index.name, m.columns.name = "train dataset", "test dataset"
    return out


def write_task_transfer(cfg: ExperimentConfig, target: TargetKey, outcome: TaskOutcome) -> TaskOutcome:
    """Matrices next to the cross-lingual ones (``transfer-matrix.task-<task>.<features>``: the report draws
    them as heatmaps); the cells with their intervals under ``<data_dir>/tasks/<target>/<task>.parquet``."""
    for source, matrix in outcome.matrices.items():
        path = transfer_matrix_file(cfg, target, f"task-{outcome.task}", source)
        write_parquet(path, matrix.reset_index(names="train_language"))
        outcome.matrix_paths.append(path)
    outcome.cells_path = task_cells_file(cfg, target, outcome.task)
    write_parquet(outcome.cells_path, outcome.cells if outcome.cells is not None else pd.DataFrame())
    return outcome


def _val_scores(res: Any) -> Any:
    """Per long row, the validation score of the probe fitted on its train language."""
    return res.long["train_language"].map(lambda lang: res.probes[lang].val_macro_f1 if lang in res.probes else math.nan)


def write_transfer(cfg: ExperimentConfig, target: TargetKey, outcome: TransferOutcome, mlflow_run_id: str) -> Path:
    rows = outcome.rows.assign(mlflow_run_id=mlflow_run_id) if outcome.rows is not None else pd.DataFrame()
    path = transfer_file(cfg, target, outcome.dataset)
    write_parquet(path, rows)
    for source, matrix in outcome.matrices.items():
        mpath = transfer_matrix_file(cfg, target, outcome.dataset, source)
        write_parquet(mpath, matrix.reset_index(names="train_language"))
        outcome.matrix_paths.append(mpath)
    outcome.results_path = path
    return path


def transfer_matrices(cfg: ExperimentConfig, files: list[Path] | None = None) -> dict[str, pd.DataFrame]:
    """Transfer matrices named '<target> <dataset> <features>': ``files`` (what the report's inputs
    name), else the saved matrices of the config's own targets and datasets (not an earlier config's)."""
    out: dict[str, pd.DataFrame] = {}
    root = results_root(cfg)
    if files is None:
        if not cfg.transfer.enabled or not root.exists():
            return out
        keys = {t.key for t in targets(cfg)}
        names = {d.name for d in cfg.datasets}
        files = [p for p in sorted(root.glob("*/transfer-matrix.*.parquet"))
                 if p.parent.name in keys and p.name.split(".")[1] in names]
    for p in sorted(Path(f) for f in files):
        _, dataset, source, _ = p.name.split(".")
        out[f"{p.parent.name} {dataset} {source}"] = pd.read_parquet(p).set_index("train_language")
    return out


def build_conditions(cfg: ExperimentConfig, target: TargetKey, pooled_handle: PooledHandle,
                     data: DatasetHandle) -> pd.DataFrame:
    """Hard-condition curves for SAE, hidden and TF-IDF features on one partition (same test rows)."""
    from mosaic_dag.evaluation.conditions import condition_curves
    from mosaic_dag.features.tfidf import make_vectorizer

    cc = cfg.conditions
    dataset, _, language = data.key.partition(".")
    frame = read_frame(data)
    r = SplitRows.of(frame)
    pooled = PooledResult.of(pooled_handle)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    parts = []
    from mosaic_dag.data.images import is_image_frame

    for source in ("sae", "hidden") + (() if is_image_frame(frame) else ("tfidf",)):
        if source == "tfidf":
            vec = make_vectorizer("word", language)
            texts = frame["text"].to_numpy()
            vec.fit(list(texts[np.concatenate([r.train, r.val])]))  # never the test texts
            X = vec.transform(list(texts))
            pooling = "word"
        else:
            pooling = cc.pooling if not (source == "hidden" and cc.pooling == "topn_count") else "mean"
            name = feature_name(source, pooling, cc.top_n if pooling == "topn_count" else None)
            X = load_matrix(pooled.files[name]) if name in pooled.files else None
            if X is None:
                continue
        curves = condition_curves(X[r.train], r.y(r.train), X[r.val], r.y(r.val), X[r.test], r.y(r.test),
                                  sizes=cc.sizes, imbalances=cc.imbalances, noise_rates=cc.noise_rates,
                                  seed=seed, n_boot=n_boot)
        parts.append(curves.assign(features=source, pooling=pooling, model=target.model, layer=target.layer,
                                   sae=target.sae if source == "sae" else "", dataset=dataset, language=language))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def conditions_table(cfg: ExperimentConfig, files: list[Path] | None = None) -> pd.DataFrame:
    """Hard-condition curves of ``files``, else of the config's own partitions (not an earlier config's)."""
    if files is None:
        if not cfg.conditions.enabled:
            return pd.DataFrame()
        files = [conditions_file(cfg, t, d.dataset, d.language) for t in targets(cfg) for d in dataset_keys(cfg)]
    frames = [read_results_file(p) for p in files if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def majority_baselines(cfg: ExperimentConfig) -> dict[str, float]:
    """Majority-class test macro-F1 per 'dataset.language' whose dataset file is on disk (drawn in the figures)."""
    from mosaic_dag.paths import dataset_file
    from mosaic_dag.probes.core import majority_baseline_f1

    out = {}
    for d in dataset_keys(cfg):
        path = dataset_file(cfg, d.dataset, d.language)
        if path.exists():
            frame = pd.read_parquet(path, columns=["label", "split"])
            r = SplitRows.of(frame)
            out[d.key] = majority_baseline_f1(r.y(np.concatenate([r.train, r.val])), r.y(r.test))
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
    from mosaic_dag.evaluation.comparisons import paired_comparison

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
    from mosaic_dag.evaluation.comparisons import COMPARISON_COLUMNS, comparison_frame, overall
    from mosaic_dag.evaluation.sweeps import best_rows

    table = results_table(cfg) if results is None else results
    if table.empty or "val_macro_f1" not in table.columns:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    table = table[table["train_language"] == table["test_language"]]
    out: list[tuple[dict[str, Any], Any]] = []
    for (model, layer, sae, dataset, language), part in table[table["features"] == "sae"].groupby(
            ["model", "layer", "sae", "dataset", "language"], sort=True):
        scope = {"scope": "partition", "model": model, "layer": int(layer), "sae": sae, "dataset": dataset, "language": language}
        same = table[(table["model"] == model) & (table["layer"] == layer) & (table["dataset"] == dataset)
                     & (table["language"] == language)]
        sel = best_rows(part).iloc[0]
        for source in ("hidden", "tfidf", "judge"):
            other = same[same["features"] == source]
            if len(other):
                p = _pair(cfg, sel, best_rows(other).iloc[0])
                if p is not None:
                    out.append((scope, p))
    tasks = []
    chosen = best_rows(table)
    for (dataset, language), part in chosen.groupby(["dataset", "language"], sort=True):
        by_source = {r["features"]: r for _, r in part.iterrows()}
        if "sae" not in by_source:
            continue
        sae_row = by_source["sae"]
        for source in ("hidden", "tfidf", "judge"):
            if source in by_source:
                p = _pair(cfg, sae_row, by_source[source])
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
