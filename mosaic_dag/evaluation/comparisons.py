"""Paired comparisons of feature sources: SAE − hidden and SAE − TF-IDF on identical test rows.

The two probes compared are the validation-selected configurations of each source (never the
test-best). Their test predictions are resampled together (one draw of row positions serves
both), so the interval is for the paired difference of macro-F1, not two independent intervals.
Verdict rule: the 95% interval above 0 → "SAE better", below 0 → "SAE worse", else "no difference".
"Overall" averages the per-task differences; each task is resampled on its own and the b-th
resamples are averaged, which is the bootstrap of that mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mosaic_dag.evaluation.selection import best_run
from mosaic_dag.probes.metrics import resampled_macro_f1


if TYPE_CHECKING:
    from mosaic_dag.evaluation.sweeps import ProbeRun

__all__ = ["COMPARISON_COLUMNS", "Paired", "comparison_metadata", "comparison_metrics", "describe", "overall",
           "paired_bootstrap", "paired_comparison", "partition_comparisons", "verdict", "with_verdicts"]

BETTER, SAME, WORSE = "SAE better", "no difference", "SAE worse"
COMPARISON_COLUMNS = [
    "scope", "model", "layer", "sae", "dataset", "language", "comparison", "sae_probe", "other_probe",
    "sae_macro_f1", "other_macro_f1", "diff", "diff_ci_low", "diff_ci_high", "sae_win_share", "n_test", "verdict",
]


def verdict(ci_low: float, ci_high: float) -> str:
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return SAME
    return BETTER if ci_low > 0 else WORSE if ci_high < 0 else SAME


def _macro_f1_all(t: np.ndarray, p: np.ndarray, n_labels: int) -> float:
    return float(resampled_macro_f1(t, p, n_labels, np.arange(t.size)[None, :])[0])


def paired_bootstrap(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, n_boot: int = 1000, seed: int = 0, chunk: int = 100
) -> tuple[float, np.ndarray]:
    """Macro-F1(a) − macro-F1(b) on all rows, and on ``n_boot`` paired resamples of the rows."""
    yt, pa, pb = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (yt.shape == pa.shape == pb.shape) or yt.ndim != 1 or yt.size == 0:
        raise ValueError(f"y_true/pred_a/pred_b: need equal non-empty 1-D shapes, got {yt.shape}, {pa.shape}, {pb.shape}")
    labels = np.unique(np.concatenate([yt, pa, pb]))
    t, a, b = (np.searchsorted(labels, v) for v in (yt, pa, pb))
    diff = _macro_f1_all(t, a, labels.size) - _macro_f1_all(t, b, labels.size)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        n = min(chunk, n_boot - start)
        idx = rng.integers(0, yt.size, size=(n, yt.size))
        out[start : start + n] = resampled_macro_f1(t, a, labels.size, idx) - resampled_macro_f1(t, b, labels.size, idx)
    return diff, out


@dataclass(frozen=True)
class Paired:
    """One SAE-vs-other comparison; ``draws`` (the resampled differences) feed ``overall``."""

    comparison: str  # "sae-hidden" | "sae-tfidf"
    sae_probe: str
    other_probe: str
    sae_macro_f1: float
    other_macro_f1: float
    diff: float
    diff_ci_low: float
    diff_ci_high: float
    sae_win_share: float
    n_test: int
    verdict: str
    draws: np.ndarray

    def record(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("draws")
        return out


def _summarise(comparison: str, sae_probe: str, other_probe: str, f1_sae: float, f1_other: float,
               diff: float, draws: np.ndarray, n_test: int) -> Paired:
    if draws.size:
        lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
        win = float(np.mean(draws > 0))
    else:
        lo = hi = win = float("nan")
    return Paired(comparison, sae_probe, other_probe, f1_sae, f1_other, float(diff), lo, hi, win, n_test,
                  verdict(lo, hi), draws)


def paired_comparison(
    comparison: str, y_true: np.ndarray, sae: tuple[str, np.ndarray], other: tuple[str, np.ndarray],
    *, n_boot: int = 1000, seed: int = 0,
) -> Paired:
    """SAE − other macro-F1 of two probes' predictions on the same test rows (same order)."""
    diff, draws = paired_bootstrap(y_true, sae[1], other[1], n_boot=n_boot, seed=seed)
    labels = np.unique(np.concatenate([np.asarray(y_true), sae[1], other[1]]))
    t = np.searchsorted(labels, np.asarray(y_true))
    f1_sae = _macro_f1_all(t, np.searchsorted(labels, sae[1]), labels.size)
    f1_other = _macro_f1_all(t, np.searchsorted(labels, other[1]), labels.size)
    return _summarise(comparison, sae[0], other[0], f1_sae, f1_other, diff, draws, int(np.asarray(y_true).size))


def overall(comparison: str, parts: Sequence[Paired]) -> Paired | None:
    """Mean of the per-task differences with the bootstrap of that mean (tasks resampled independently)."""
    parts = [p for p in parts if p.comparison == comparison]
    if not parts:
        return None
    sizes = {p.draws.size for p in parts}
    draws = np.mean([p.draws for p in parts], axis=0) if len(sizes) == 1 else np.empty(0)
    return _summarise(comparison, "selected per task", "selected per task",
                      float(np.mean([p.sae_macro_f1 for p in parts])), float(np.mean([p.other_macro_f1 for p in parts])),
                      float(np.mean([p.diff for p in parts])), draws, int(sum(p.n_test for p in parts)))


def comparison_frame(rows: Sequence[tuple[Mapping[str, object], Paired]]) -> pd.DataFrame:
    """Tidy table (COMPARISON_COLUMNS) from (scope fields, comparison) pairs."""
    blank: dict[str, object] = {c: "" for c in COMPARISON_COLUMNS[:6]} | {"layer": None}
    records = [{**blank, **dict(scope), **p.record()} for scope, p in rows]
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


def partition_comparisons(runs: "list[ProbeRun]", y_test: np.ndarray, *, n_boot: int, seed: int) -> list[Paired]:
    """SAE − hidden and SAE − TF-IDF for the validation-selected probe of each source."""
    sae = best_run(runs, "sae")
    out: list[Paired] = []
    if sae is None:
        return out
    for other_features in ("hidden", "tfidf"):
        other = best_run(runs, other_features)
        if other is None:
            continue
        if list(other.test_ids) != list(sae.test_ids):
            raise ValueError(f"{other.spec.label}: scored on other test rows than {sae.spec.label}; cannot pair them")
        out.append(paired_comparison(f"sae-{other_features}", y_test, (sae.spec.label, np.asarray(sae.result.test_pred)),
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


def with_verdicts(table: pd.DataFrame, comparisons: list[Paired]) -> pd.DataFrame:
    out = table.copy()
    sel = out.index[out["selected"] & (out["features"] == "sae")]
    for p in comparisons:
        out.loc[sel, "vs_" + p.comparison.removeprefix("sae-")] = describe(p)
    return out
