"""Probe sweeps over every (features, pooling, threshold, classifier) and the tidy results table.

SAE, hidden-state and TF-IDF probes of one partition are scored on the SAME test rows (same ids);
hyper-parameters are chosen on train/validation only (see mosaic_dag.probes.core).

Selection rule: the configuration reported as "best" for a feature source — within a partition and
across layers, SAEs, poolings, thresholds, top-n, classifiers and k — is the one with the highest
``val_macro_f1`` (cross-validated on train+validation; ties: the first in the config's order). Its
TEST macro-F1 is what gets printed, plotted, shown and logged; the test-best is never a selection.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.evaluation.comparisons import Paired, paired_comparison
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import MosaicError
from mosaic_dag.features.pooled import PooledResult, feature_name, load_matrix
from mosaic_dag.handles import DatasetHandle, PooledHandle
from mosaic_dag.paths import predictions_file, results_file, results_root
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from mosaic_dag.data.step import read_frame
from mosaic_dag.features.pooling import binarize
from mosaic_dag.probes.core import (
    ProbeResult,
    fit_ksparse,
    fit_logistic,
    fit_tree,
    majority_baseline_f1,
    save_model,
    top_latents,
)
from mosaic_dag.storage import write_parquet
from mosaic_dag.tables import markdown_table
from mosaic_dag.features.tfidf import fit_tfidf

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "model", "layer", "sae", "dataset", "language", "features", "pooling", "threshold", "top_n",
    "classifier", "k", "train_language", "test_language", "probe", "val_macro_f1", "selected",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "auroc", "n_train", "n_test",
    "vs_hidden", "vs_tfidf", "vs_judge", "cost", "mlflow_run_id",
]
KEY_COLUMNS = [
    "model", "layer", "sae", "dataset", "language", "features", "pooling", "threshold", "top_n",
    "classifier", "k", "train_language", "test_language",
]
# one selection per feature source and task: across layers, SAEs and every probe setting
SELECTION_KEYS = ["dataset", "language", "train_language", "test_language", "features"]


@dataclass
class ProbeSpec:
    features: str  # sae | hidden | tfidf
    pooling: str | None
    top_n: int | None
    threshold: float | None
    classifier: str
    k: int | None

    @property
    def label(self) -> str:
        parts = [self.features, self.pooling or "", f"n{self.top_n}" if self.top_n else "",
                 f"t{self.threshold}" if self.threshold is not None else "", self.classifier, f"k{self.k}" if self.k else ""]
        return "/".join(p for p in parts if p)


def probe_specs(cfg: ExperimentConfig) -> list[ProbeSpec]:
    """Every probe the config asks for, in a fixed order."""
    cls = cfg.classification
    out: list[ProbeSpec] = []

    def classifiers(features: str, pooling: str, top_n: int | None, threshold: float | None) -> None:
        for c in cls.classifiers:
            if c == "ksparse":
                out.extend(ProbeSpec(features, pooling, top_n, threshold, c, k) for k in cls.k)
            else:
                out.append(ProbeSpec(features, pooling, top_n, threshold, c, None))

    for pooling in cls.poolings:
        for top_n in (cls.top_n if pooling == "topn_count" else [None]):
            for threshold in cls.thresholds:
                classifiers("sae", pooling, top_n, threshold)
    for pooling in cls.poolings:
        if pooling != "topn_count":
            classifiers("hidden", pooling, None, None)
    out.extend(ProbeSpec("tfidf", analyzer, None, None, "logistic", None) for analyzer in cls.tfidf)
    return out


@dataclass
class SplitRows:
    """Row positions of each split, and their ids/labels (one frame serves every feature source)."""

    frame: pd.DataFrame
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "SplitRows":
        s = frame["split"].to_numpy()
        return cls(frame, np.flatnonzero(s == "train"), np.flatnonzero(s == "validation"), np.flatnonzero(s == "test"))

    def y(self, idx: np.ndarray) -> np.ndarray:
        return self.frame["label"].to_numpy()[idx]

    @property
    def test_ids(self) -> list[str]:
        return self.frame["id"].to_numpy()[self.test].tolist()


@dataclass
class ProbeRun:
    spec: ProbeSpec
    result: ProbeResult
    test_ids: list[str]


@dataclass
class PartitionResults:
    """``predictions``: one row per test id (``id``, ``y_true``, then one column per probe label)."""

    table: pd.DataFrame
    runs: list[ProbeRun] = field(default_factory=list)
    pooled: PooledResult | None = None
    majority_f1: float = float("nan")
    train_ids: list[str] = field(default_factory=list)
    predictions: pd.DataFrame | None = None
    comparisons: list[Paired] = field(default_factory=list)


def _fit(spec: ProbeSpec, X: Any, rows: SplitRows, seed: int, n_boot: int, language: str) -> ProbeResult:
    tr, va, te = rows.train, rows.val, rows.test
    if spec.features == "tfidf":
        texts = rows.frame["text"].to_numpy()
        return fit_tfidf(list(texts[tr]), rows.y(tr), list(texts[va]), rows.y(va), list(texts[te]), rows.y(te),
                         analyzer=spec.pooling or "word", language=language, seed=seed, n_boot=n_boot)
    args = (X[tr], rows.y(tr), X[va], rows.y(va), X[te], rows.y(te))
    if spec.classifier == "logistic":
        return fit_logistic(*args, seed=seed, n_boot=n_boot)
    if spec.classifier == "tree":
        return fit_tree(*args, seed=seed, n_boot=n_boot)
    return fit_ksparse(*args, k=int(spec.k or 1), seed=seed, n_boot=n_boot)


def run_probes(
    cfg: ExperimentConfig, target: TargetKey, pooled_handle: PooledHandle, data: DatasetHandle,
    mlflow_run_id: str = "", progress: Callable[[int, int], None] | None = None,
) -> PartitionResults:
    """Fit every configured probe on one (target, dataset) partition; identical test rows for all."""
    pooled = PooledResult.of(pooled_handle)
    frame = read_frame(data)
    dataset, _, language = data.key.partition(".")
    rows = SplitRows.of(frame)
    cls = cfg.classification
    from mosaic_dag.data.images import is_image_frame

    # TF-IDF reads words: an image partition has none, so it has no TF-IDF rows (README: images)
    specs = [s for s in probe_specs(cfg) if not (s.features == "tfidf" and is_image_frame(frame))]
    cache: dict[str, Any] = {}
    runs: list[ProbeRun] = []
    records = []
    for i, spec in enumerate(specs):
        X = None
        if spec.features != "tfidf":
            name = feature_name(spec.features, spec.pooling or "", spec.top_n)
            if name not in cache:
                cache[name] = load_matrix(pooled.files[name])
            X = cache[name]
            if spec.features == "sae" and spec.threshold is not None:
                X = binarize(X, spec.threshold, signed=pooled.signed)
        if spec.k is not None and X is not None and spec.k > X.shape[1]:
            continue
        result = _fit(spec, X, rows, cls.seed, cls.bootstrap, language)
        runs.append(ProbeRun(spec, result, rows.test_ids))
        m = result.metrics
        records.append({
            "model": target.model, "layer": target.layer, "sae": target.sae if spec.features == "sae" else "",
            "dataset": dataset, "language": language, "features": spec.features,
            "pooling": spec.pooling or "", "threshold": spec.threshold if spec.threshold is not None else math.nan,
            "top_n": spec.top_n, "classifier": spec.classifier, "k": spec.k, "train_language": language, "test_language": language,
            "probe": spec.label, "val_macro_f1": result.val_macro_f1, "selected": False, "macro_f1": m.macro_f1, "macro_f1_ci_low": m.macro_f1_ci_low, "macro_f1_ci_high": m.macro_f1_ci_high,
            "accuracy": m.accuracy, "auroc": m.auroc, "n_train": m.n_train, "n_test": m.n_test,
            "vs_hidden": "", "vs_tfidf": "", "vs_judge": "", "cost": "", "mlflow_run_id": mlflow_run_id,
        })
        if progress:
            progress(i + 1, len(specs))
    table = _typed(pd.DataFrame.from_records(records, columns=RESULT_COLUMNS))
    table = mark_selected(table)
    majority = majority_baseline_f1(rows.y(np.concatenate([rows.train, rows.val])), rows.y(rows.test))
    train_ids = frame["id"].to_numpy()[np.concatenate([rows.train, rows.val])].tolist()
    predictions = predictions_frame(runs, rows.test_ids, rows.y(rows.test))
    comparisons = partition_comparisons(runs, rows.y(rows.test), n_boot=cls.bootstrap, seed=cls.seed)
    table = _with_verdicts(table, comparisons)
    return PartitionResults(table, runs, pooled, majority, train_ids, predictions, comparisons)


def predictions_frame(runs: list[ProbeRun], test_ids: list[str], y_test: np.ndarray) -> pd.DataFrame:
    """Per-row test predictions of every probe (what paired comparisons across partitions re-read)."""
    cols: dict[str, Any] = {"id": list(test_ids), "y_true": np.asarray(y_test)}
    for run in runs:
        cols[run.spec.label] = np.asarray(run.result.test_pred)
    return pd.DataFrame(cols)


def partition_comparisons(runs: list[ProbeRun], y_test: np.ndarray, *, n_boot: int, seed: int) -> list[Paired]:
    """SAE − hidden and SAE − TF-IDF for the validation-selected probe of each source."""
    sae = best_run(runs, "sae")
    out: list[Paired] = []
    if sae is None:
        return out
    for other_source in ("hidden", "tfidf"):
        other = best_run(runs, other_source)
        if other is None:
            continue
        if list(other.test_ids) != list(sae.test_ids):
            raise ValueError(f"{other.spec.label}: scored on other test rows than {sae.spec.label}; cannot pair them")
        out.append(paired_comparison(f"sae-{other_source}", y_test, (sae.spec.label, np.asarray(sae.result.test_pred)),
                                     (other.spec.label, np.asarray(other.result.test_pred)), n_boot=n_boot, seed=seed))
    return out


def describe(p: Paired) -> str:
    """One plain line: verdict, difference and its paired 95% interval."""
    return (f"{p.verdict}: {p.diff:+.3f} [{p.diff_ci_low:+.3f}, {p.diff_ci_high:+.3f}], "
            f"SAE wins {p.sae_win_share:.0%} of resamples")


def comparison_metrics(comparisons: list[Paired]) -> dict[str, float]:
    """MLflow metrics of the paired comparisons, e.g. ``sae_minus_hidden_macro_f1``."""
    out: dict[str, float] = {}
    for p in comparisons:
        name = "sae_minus_" + p.comparison.removeprefix("sae-")
        out |= {f"{name}_macro_f1": p.diff, f"{name}_ci_low": p.diff_ci_low, f"{name}_ci_high": p.diff_ci_high,
                f"{name}_win_share": p.sae_win_share}
    return out


def comparison_metadata(comparisons: list[Paired]) -> dict[str, str]:
    """Dagster metadata: one plain line per comparison, e.g. ``sae_vs_hidden``."""
    return {"sae_vs_" + p.comparison.removeprefix("sae-"): describe(p) for p in comparisons}


def _with_verdicts(table: pd.DataFrame, comparisons: list[Paired]) -> pd.DataFrame:
    out = table.copy()
    sel = out.index[out["selected"] & (out["features"] == "sae")]
    for p in comparisons:
        out.loc[sel, "vs_" + p.comparison.removeprefix("sae-")] = describe(p)
    return out


def mark_selected(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """``selected`` = True on the validation-best row of each group (in-language rows only; ties: table order)."""
    out = table.copy()
    out["selected"] = False
    if not out.empty:
        out.loc[_best_index(out, keys), "selected"] = True
    return out


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Nullable integers for optional settings (top_n, k): empty in CSV, never a -1 sentinel."""
    out = table.copy()
    for col in ("top_n", "k"):
        out[col] = pd.array([None if pd.isna(v) else int(v) for v in out[col]], dtype="Int64")
    for col in ("layer", "n_train", "n_test"):
        out[col] = out[col].astype("int64")
    out["threshold"] = out["threshold"].astype("float64")
    if "val_macro_f1" in out.columns:
        out["val_macro_f1"] = out["val_macro_f1"].astype("float64")
        out["selected"] = out["selected"].astype(bool)
    return out


def _val_key(v: float) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else -math.inf


def _best_index(table: pd.DataFrame, keys: list[str] | None) -> pd.Index:
    keys = list(keys or SELECTION_KEYS)
    rows = table[table["train_language"] == table["test_language"]] if "train_language" in table.columns else table
    val = rows["val_macro_f1"].map(_val_key) if "val_macro_f1" in rows.columns else pd.Series(-math.inf, index=rows.index)
    # ties: a row its partition selected (config order) first, then table order; never the test score
    sel = rows["selected"].astype(bool) if "selected" in rows.columns else pd.Series(False, index=rows.index)
    order = rows.assign(_val=val, _sel=sel).sort_values(["_val", "_sel"], ascending=False, kind="stable")
    return order.groupby(keys, sort=False).head(1).index


def best_rows(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """The selected configuration per feature source and task: highest ``val_macro_f1``.

    ``keys`` default: across layers and SAEs (``SELECTION_KEYS``); pass partition columns to select
    within a layer. Only in-language rows are candidates. Ties keep the first row; test scores
    never take part.
    """
    if table.empty:
        return table
    return table.loc[_best_index(table, keys)].sort_values(list(keys or SELECTION_KEYS), kind="stable").reset_index(drop=True)


def oracle_rows(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """The TEST-best row per group: an oracle for reference only, never a selection."""
    if table.empty:
        return table
    keys = list(keys or SELECTION_KEYS)
    order = table.sort_values("macro_f1", ascending=False, kind="stable")
    return order.groupby(keys, sort=False).head(1).sort_values(keys, kind="stable").reset_index(drop=True)


def best_run(runs: list[ProbeRun], features: str) -> ProbeRun | None:
    """The validation-selected probe of one feature source (ties: the first)."""
    cands = [r for r in runs if r.spec.features == features]
    return max(cands, key=lambda r: _val_key(r.result.val_macro_f1), default=None)


def selected_run_log(results: PartitionResults, label_names: dict[int, str] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, float]]:
    """What a partition's MLflow run records for each source's validation-selected probe.

    Params: its configuration (pooling, threshold, top-n, classifier, k) and the fitted hyper-parameters
    (``<source>.<name>``). Metrics: test macro-F1 with its 95% CI bounds, accuracy, AUROC, the validation
    score it was selected by, and precision/recall/F1 per class (``<source>_<class>_f1``)."""
    params: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    names = label_names or {}
    for source in ("sae", "hidden", "tfidf"):
        run = best_run(results.runs, source)
        if run is None:
            continue
        spec, m = run.spec, run.result.metrics
        params |= {f"{source}.probe": spec.label, f"{source}.pooling": spec.pooling or "", f"{source}.classifier": spec.classifier,
                   f"{source}.threshold": spec.threshold, f"{source}.top_n": spec.top_n, f"{source}.k": spec.k}
        params |= {f"{source}.{k}": v for k, v in (run.result.params or {}).items()}
        metrics |= {f"{source}_macro_f1": m.macro_f1, f"{source}_macro_f1_ci_low": m.macro_f1_ci_low,
                    f"{source}_macro_f1_ci_high": m.macro_f1_ci_high, f"{source}_accuracy": m.accuracy,
                    f"{source}_auroc": m.auroc, f"{source}_val_macro_f1": run.result.val_macro_f1}
        for cls_value, scores in m.per_class.items():
            try:
                name = names.get(int(cls_value), str(cls_value))
            except ValueError:
                name = str(cls_value)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
            metrics |= {f"{source}_{safe}_{k}": float(v) for k, v in scores.items() if k != "support"}
    return params, metrics


def top_latents_table(run: ProbeRun, neuronpedia_id: str | None, label_names: dict[int, str], top: int = 10) -> pd.DataFrame:
    """Top SAE latents per class of a linear probe (index, weight, Neuronpedia link when known)."""
    records = []
    for cls_value, items in top_latents(run.result, top=top).items():
        for index, weight in items:
            link = f"https://www.neuronpedia.org/{neuronpedia_id}/{index}" if neuronpedia_id else ""
            records.append({"class": label_names.get(int(cls_value), str(cls_value)), "latent": int(index),
                            "weight": round(float(weight), 4), "neuronpedia": link})
    return pd.DataFrame.from_records(records, columns=["class", "latent", "weight", "neuronpedia"])


def label_names(frame: pd.DataFrame) -> dict[int, str]:
    return dict(zip(frame["label"].astype(int), frame["label_name"].astype(str)))


def top_latents_markdown(results: PartitionResults, names: dict[int, str]) -> str:
    """Top latents of the best linear SAE probe, as markdown (what the probes asset shows)."""
    linear = [r for r in results.runs if r.spec.features == "sae" and r.spec.classifier == "logistic"]
    if not linear:
        return "no linear SAE probe"
    top = max(linear, key=lambda r: _val_key(r.result.val_macro_f1))
    neuronpedia = results.pooled.neuronpedia_id if results.pooled else None
    return f"probe: `{top.spec.label}`\n\n" + markdown_table(top_latents_table(top, neuronpedia, names))


def best_artifacts(results: PartitionResults, frame: pd.DataFrame, folder: Path) -> list[tuple[Path, str]]:
    """Confusion PNG and skops model of the best probe per feature source, written into ``folder``.

    Returns (file, artifact folder) pairs for the tracker, in source order sae, hidden, tfidf.
    """
    names = label_names(frame)
    y_test = frame["label"].to_numpy()[frame["split"].to_numpy() == "test"]
    out: list[tuple[Path, str]] = []
    for source in ("sae", "hidden", "tfidf"):
        best = best_run(results.runs, source)
        if best is None:
            continue
        png = confusion_png(best, y_test, names, folder / f"confusion-{source}.png", f"{source}: {best.spec.label}")
        out.append((png, "confusion"))
        out.append((save_model(best.result.model, folder / f"best-{source}.skops"), "models"))
    return out


@dataclass(frozen=True)
class ProbeChecks:
    """What the probes asset checks: SAE beats the majority class; train and test rows never overlap;
    every probe of the partition scored the same test rows."""

    sae_macro_f1: float
    majority_macro_f1: float
    train_test_overlap: int
    distinct_test_sets: int


def probe_checks(results: PartitionResults) -> ProbeChecks:
    sae_best = best_run(results.runs, "sae")
    test_ids = {tuple(r.test_ids) for r in results.runs}
    overlap = len(set(results.train_ids) & set(next(iter(test_ids)))) if test_ids else 0
    return ProbeChecks(sae_macro_f1=sae_best.result.metrics.macro_f1 if sae_best else float("nan"),
                       majority_macro_f1=results.majority_f1, train_test_overlap=overlap,
                       distinct_test_sets=len(test_ids))


def write_results(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str, table: pd.DataFrame,
                  predictions: pd.DataFrame | None = None) -> Path:
    """The partition's results rows (and, when given, its per-row test predictions, written first)."""
    if predictions is not None:
        write_parquet(predictions_file(cfg, target, dataset, language), predictions)
    path = results_file(cfg, target, dataset, language)
    write_parquet(path, table)
    return path


def iter_result_files(cfg: ExperimentConfig, *, every: bool = False) -> Iterator[Path]:
    """The results parquets of the config's own partitions (probe rows, then transfer rows).

    ``every=True`` lists every results file under the data folder instead, including those of
    earlier configs (other layers, models, datasets) that share it.
    """
    root = results_root(cfg)
    if not root.exists():
        return
    if every:
        yield from sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("transfer-matrix."))
        return
    for target in targets(cfg):
        for dkey in dataset_keys(cfg):
            path = results_file(cfg, target, dkey.dataset, dkey.language)
            if path.exists():
                yield path
            judged = path.with_name(f"judge.{path.name}")  # the judge baseline's row (mosaic_dag.evaluation.judge)
            if cfg.judge.enabled and judged.exists():
                yield judged
        if cfg.transfer.enabled:
            for d in cfg.datasets:
                path = root / target.key / f"transfer.{d.name}.parquet"
                if path.exists():
                    yield path


def read_results_file(path: Path) -> pd.DataFrame:
    """One results parquet; an unreadable one is a one-line error naming it and the fix."""
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
        text = str(err).strip()
        reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise MosaicError(
            f"results file {str(path)!r} is not readable parquet ({reason}); delete it and run "
            "`mosaic run --config` again to recompute that partition"
        ) from None


def results_table(cfg: ExperimentConfig, files: list[Path] | None = None, *, every: bool = False) -> pd.DataFrame:
    """The results of ``files``, else of the config's own partitions, in one tidy table; hidden/TF-IDF rows
    shared by SAEs appear once.

    Results an earlier config left in the same data folder (say, layer 3 before ``layers`` became
    ``[5]``) are not shown unless ``every=True``.
    """
    chosen = list(iter_result_files(cfg, every=every)) if files is None else files
    frames = [read_results_file(p) for p in chosen]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    for col in RESULT_COLUMNS:  # tables written before a column existed
        if col not in table.columns:
            table[col] = {"selected": False, "val_macro_f1": math.nan}.get(col, "")
    table = table.drop_duplicates(subset=KEY_COLUMNS, keep="first")
    return table.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)[RESULT_COLUMNS]


def confusion_png(run: ProbeRun, y_true: np.ndarray, label_names: dict[int, str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    from mosaic_dag.storage import atomic_path

    classes = np.asarray(run.result.classes)
    cm = confusion_matrix(y_true, run.result.test_pred, labels=classes)
    names = [label_names.get(int(c), str(c)) for c in classes]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.1 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
