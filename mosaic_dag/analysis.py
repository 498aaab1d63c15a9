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
from mosaic_dag.evaluation import RESULT_COLUMNS, SplitRows, _typed, results_table
from mosaic_dag.features import build_pooled, feature_name, load_matrix
from mosaic_dag.partitions import Target
from mosaic_dag.pipeline import read_dataset
from mosaic_dag.pooling import binarize
from mosaic_dag.storage import write_parquet


def multilingual_datasets(cfg: ExperimentConfig) -> list[str]:
    return [d.name for d in cfg.datasets if len(cfg.dataset_languages(d.name)) >= 2]


@dataclass
class TransferOutcome:
    dataset: str
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)  # features -> train x test macro-F1
    rows: pd.DataFrame | None = None
    results_path: Path | None = None


def _feature_matrix(cfg: ExperimentConfig, target: Target, dataset: str, language: str, source: str) -> Any:
    tc = cfg.transfer
    pooled = build_pooled(cfg, target, dataset, language)
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


def build_transfer(cfg: ExperimentConfig, target: Target, dataset: str) -> TransferOutcome:
    """Train on each language, test on every language: SAE, hidden and TF-IDF matrices."""
    from mosaic_dag.transfer import Split, tfidf_transfer_matrix, transfer_matrix

    languages = cfg.dataset_languages(dataset)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    frames = {lang: read_dataset(cfg, dataset, lang).frame for lang in languages}
    rows = {lang: SplitRows.of(frames[lang]) for lang in languages}
    out = TransferOutcome(dataset)
    records: list[pd.DataFrame] = []
    for source in ("sae", "hidden"):
        splits = {}
        pooling, top_n = "", None
        for lang in languages:
            X, pooling, top_n = _feature_matrix(cfg, target, dataset, lang, source)
            r = rows[lang]
            splits[lang] = Split(X[r.train], r.y(r.train), X[r.val], r.y(r.val), X[r.test], r.y(r.test),
                                 np.asarray(frames[lang]["id"].to_numpy()[r.test]))
        res = transfer_matrix(splits, seed=seed, n_boot=n_boot)
        out.matrices[source] = res.matrix
        records.append(res.long.assign(features=source, pooling=pooling, top_n=top_n,
                                       threshold=cfg.transfer.threshold if source == "sae" else math.nan,
                                       val_macro_f1=_val_scores(res)))
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
        "vs_hidden": "", "vs_tfidf": "", "mlflow_run_id": "",
    })[RESULT_COLUMNS]
    out.rows = _typed(table.reset_index(drop=True))
    return out


def _val_scores(res: Any) -> Any:
    """Per long row, the validation score of the probe fitted on its train language."""
    return res.long["train_language"].map(lambda lang: res.probes[lang].val_macro_f1 if lang in res.probes else math.nan)


def write_transfer(cfg: ExperimentConfig, target: Target, outcome: TransferOutcome, mlflow_run_id: str) -> Path:
    folder = cfg.data_path / "results" / target.key
    rows = outcome.rows.assign(mlflow_run_id=mlflow_run_id) if outcome.rows is not None else pd.DataFrame()
    path = folder / f"transfer.{outcome.dataset}.parquet"
    write_parquet(path, rows)
    for source, matrix in outcome.matrices.items():
        write_parquet(folder / f"transfer-matrix.{outcome.dataset}.{source}.parquet", matrix.reset_index(names="train_language"))
    outcome.results_path = path
    return path


def transfer_matrices(cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """Every saved transfer matrix, named '<target> <dataset> <features>'."""
    out = {}
    root = cfg.data_path / "results"
    for p in sorted(root.glob("*/transfer-matrix.*.parquet")) if root.exists() else []:
        _, dataset, source, _ = p.name.split(".")
        out[f"{p.parent.name} {dataset} {source}"] = pd.read_parquet(p).set_index("train_language")
    return out


def build_conditions(cfg: ExperimentConfig, target: Target, dataset: str, language: str) -> pd.DataFrame:
    """Hard-condition curves for SAE, hidden and TF-IDF features on one partition (same test rows)."""
    from mosaic_dag.conditions import condition_curves
    from mosaic_dag.tfidf import make_vectorizer

    cc = cfg.conditions
    frame = read_dataset(cfg, dataset, language).frame
    r = SplitRows.of(frame)
    pooled = build_pooled(cfg, target, dataset, language)
    seed, n_boot = cfg.classification.seed, cfg.classification.bootstrap
    parts = []
    for source in ("sae", "hidden", "tfidf"):
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


def conditions_file(cfg: ExperimentConfig, target: Target, dataset: str, language: str) -> Path:
    return cfg.data_path / "conditions" / target.key / f"{dataset}.{language}.parquet"


def conditions_table(cfg: ExperimentConfig) -> pd.DataFrame:
    root = cfg.data_path / "conditions"
    frames = [pd.read_parquet(p) for p in sorted(root.rglob("*.parquet"))] if root.exists() else []
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_report(cfg: ExperimentConfig) -> Any:
    """``<data_dir>/report/index.md`` + PNGs from everything materialized so far."""
    from mosaic_dag.report import write_report

    results = results_table(cfg)
    conditions = conditions_table(cfg)
    transfer = transfer_matrices(cfg)
    extra = (f"Experiment `{cfg.name}`: {len(results)} probe rows, {len(transfer)} transfer matrices, "
             f"{len(conditions)} hard-condition points. Data folder: `{cfg.data_path}`.\n")
    comparisons = comparisons_table(cfg, results)
    return write_report(cfg.data_path / "report", results, transfer or None,
                        conditions if len(conditions) else None, extra_md=extra, comparisons=comparisons,
                        title=f"MOSAIC report: {cfg.name}")


def _predictions_for(cfg: ExperimentConfig, row: pd.Series) -> pd.DataFrame | None:
    """The stored test predictions holding ``row``'s probe (hidden/TF-IDF rows: any SAE target of its layer)."""
    from mosaic_dag.evaluation import predictions_file

    root = cfg.data_path / "predictions"
    name = f"{row['dataset']}.{row['language']}.parquet"
    if row["sae"]:
        target = Target(str(row["model"]), int(row["layer"]), str(row["sae"]))
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
    from mosaic_dag.comparisons import paired_comparison

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
    from mosaic_dag.comparisons import COMPARISON_COLUMNS, comparison_frame, overall
    from mosaic_dag.evaluation import best_rows

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
        for source in ("hidden", "tfidf"):
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
        for source in ("hidden", "tfidf"):
            if source in by_source:
                p = _pair(cfg, sae_row, by_source[source])
                if p is not None:
                    scope = {"scope": "task", "model": sae_row["model"], "layer": int(sae_row["layer"]),
                             "sae": sae_row["sae"], "dataset": dataset, "language": language}
                    out.append((scope, p))
                    tasks.append(p)
    for comparison in ("sae-hidden", "sae-tfidf"):
        p = overall(comparison, tasks)
        if p is not None:
            out.append(({"scope": "overall"}, p))
    return comparison_frame(out)
