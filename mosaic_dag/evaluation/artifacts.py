"""What the probes asset records for a partition: the MLflow params/metrics of each source's selected probe,
its top SAE latents, a confusion matrix and the skops file of the best probe per feature source, and the asset checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.evaluation.selection import best_run, validation_key
from mosaic_dag.evaluation.sweeps import PartitionResults, ProbeRun
from mosaic_dag.probes.interpret import top_latents
from mosaic_dag.probes.io import save_probe
from mosaic_dag.tables import markdown_table

__all__ = ["ProbeChecks", "confusion_png", "label_names", "probe_checks", "selected_run_log", "write_best_artifacts",
           "top_latents_markdown", "top_latents_table"]


def selected_run_log(results: PartitionResults, label_names: dict[int, str] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, float]]:
    """What a partition's MLflow run records for each source's validation-selected probe.

    Params: its configuration (pooling, threshold, top-n, classifier, k) and the fitted hyper-parameters
    (``<features>.<name>``). Metrics: test macro-F1 with its 95% CI bounds, accuracy, AUROC, the validation
    score it was selected by, and precision/recall/F1 per class (``<features>_<class>_f1``)."""
    params: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    names = label_names or {}
    for features in ("sae", "hidden", "tfidf"):
        run = best_run(results.runs, features)
        if run is None:
            continue
        spec, m = run.spec, run.result.metrics
        params |= {f"{features}.probe": spec.label, f"{features}.pooling": spec.pooling or "", f"{features}.classifier": spec.classifier,
                   f"{features}.threshold": spec.threshold, f"{features}.top_n": spec.top_n, f"{features}.k": spec.k}
        params |= {f"{features}.{k}": v for k, v in (run.result.params or {}).items()}
        metrics |= {f"{features}_macro_f1": m.macro_f1, f"{features}_macro_f1_ci_low": m.macro_f1_ci_low,
                    f"{features}_macro_f1_ci_high": m.macro_f1_ci_high, f"{features}_accuracy": m.accuracy,
                    f"{features}_auroc": m.auroc, f"{features}_validation_macro_f1": run.result.validation_macro_f1}
        for cls_value, scores in m.per_class.items():
            try:
                name = names.get(int(cls_value), str(cls_value))
            except ValueError:
                name = str(cls_value)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
            metrics |= {f"{features}_{safe}_{k}": float(v) for k, v in scores.items() if k != "support"}
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
    top = max(linear, key=lambda r: validation_key(r.result.validation_macro_f1))
    neuronpedia = results.pooled.neuronpedia_id if results.pooled else None
    return f"probe: `{top.spec.label}`\n\n" + markdown_table(top_latents_table(top, neuronpedia, names))


def write_best_artifacts(results: PartitionResults, frame: pd.DataFrame, folder: Path) -> list[tuple[Path, str]]:
    """Confusion PNG and skops model of the best probe per feature source, written into ``folder``.

    Returns (file, artifact folder) pairs for the tracker, in source order sae, hidden, tfidf.
    """
    names = label_names(frame)
    y_test = frame["label"].to_numpy()[frame["split"].to_numpy() == "test"]
    out: list[tuple[Path, str]] = []
    for features in ("sae", "hidden", "tfidf"):
        best = best_run(results.runs, features)
        if best is None:
            continue
        png = confusion_png(best, y_test, names, folder / f"confusion-{features}.png", f"{features}: {best.spec.label}")
        out.append((png, "confusion"))
        out.append((save_probe(best.result.estimator, folder / f"best-{features}.skops"), "models"))
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
