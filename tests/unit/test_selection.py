"""Honest selection and paired comparisons: "best" is chosen on validation, SAE vs others is paired."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from mosaic_dag.evaluation.artifacts import probe_checks, write_best_artifacts
from mosaic_dag.evaluation.comparisons import overall, paired_bootstrap, paired_comparison, partition_comparisons, verdict
from mosaic_dag.evaluation.schema import typed_results
from mosaic_dag.evaluation.selection import best_rows, best_run, mark_selected, oracle_rows
from mosaic_dag.evaluation.sweeps import PartitionResults, ProbeRun, ProbeSpec
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.tree import fit_tree
from mosaic_dag.report.markdown import plot_sources, write_report


def _row(features: str, classifier: str, val: float, test: float, layer: int = 6, **extra) -> dict:
    base = {"model": "m", "layer": layer, "sae": "s" if features == "sae" else "", "dataset": "d", "language": "en",
            "features": features, "pooling": "mean", "threshold": np.nan, "top_n": None, "classifier": classifier,
            "k": None, "train_language": "en", "test_language": "en", "probe": f"{features}/mean/{classifier}/L{layer}",
            "validation_macro_f1": val, "selected": False, "macro_f1": test, "macro_f1_ci_low": test - 0.05,
            "macro_f1_ci_high": test + 0.05, "accuracy": test, "auroc": np.nan, "n_train": 80, "n_test": 20,
            "vs_hidden": "", "vs_tfidf": "", "mlflow_run_id": ""}
    return base | extra


def _planted_table() -> pd.DataFrame:
    """SAE 'tree' is best on TEST and worst on validation; SAE 'logistic' at layer 12 is validation-best."""
    return typed_results(pd.DataFrame([
        _row("sae", "tree", val=0.51, test=0.99),
        _row("sae", "logistic", val=0.80, test=0.70),
        _row("sae", "ksparse", val=0.90, test=0.75, layer=12),
        _row("hidden", "logistic", val=0.85, test=0.95),
        _row("hidden", "tree", val=0.60, test=0.97),
        _row("tfidf", "logistic", val=0.70, test=0.72, pooling="", analyzer="word"),
        # a transfer row with a high validation score must never be a selection
        _row("sae", "logistic", val=0.99, test=0.10, train_language="fr", test_language="en"),
    ]))


def test_test_best_worst_on_validation_is_never_reported_best(tmp_path: Path) -> None:
    table = _planted_table()
    best = best_rows(table).set_index("features")
    assert best.loc["sae", "classifier"] == "ksparse" and best.loc["sae", "layer"] == 12  # across layers, on val
    assert best.loc["sae", "macro_f1"] == 0.75
    assert best.loc["hidden", "classifier"] == "logistic"
    # within one layer the planted test-best still loses
    per_layer = best_rows(table, ["model", "layer", "dataset", "language", "features"])
    assert 0.99 not in per_layer["macro_f1"].tolist() and 0.97 not in per_layer["macro_f1"].tolist()
    marked = mark_selected(table)
    assert marked.loc[marked["selected"], "macro_f1"].sort_values().tolist() == [0.72, 0.75, 0.95]
    # the oracle exists only under its own name
    assert oracle_rows(table[table["train_language"] == table["test_language"]]).set_index("features").loc["sae", "macro_f1"] == 0.99

    report = write_report(tmp_path / "r", table)
    text = report.index.read_text()
    selected_part = text.split("## Selected configuration per source")[1].split("## ")[0]
    header, _, *lines = [ln for ln in selected_part.splitlines() if ln.startswith("|")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    sae_line = next(ln for ln in lines if "| sae |" in ln)
    cells = dict(zip(cols, (c.strip() for c in sae_line.strip("|").split("|")), strict=True))
    assert (cells["classifier"], cells["macro_f1"], cells["oracle_test_best_macro_f1"]) == ("ksparse", "0.75", "0.99")
    assert "selected on validation" in text or "chosen by validation" in text.lower()


def test_plot_uses_validation_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mosaic_dag.report.figures as figures

    seen = []
    real = figures.best
    monkeypatch.setattr(figures, "best", lambda df, keys: seen.append(real(df, keys)) or seen[-1])
    assert plot_sources(_planted_table(), tmp_path / "s.png").written
    picked = seen[-1].set_index("_features")["macro_f1"].to_dict()
    assert picked == {"sae": 0.75, "hidden": 0.95, "tfidf": 0.72}


def _runs() -> tuple[list[ProbeRun], np.ndarray]:
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    X = np.c_[y + rng.normal(0, 0.8, n), rng.normal(size=(n, 3))]
    Xtr, Xva, Xte = X[:240], X[240:320], X[320:]
    ytr, yva, yte = y[:240], y[240:320], y[320:]
    good = fit_logistic(Xtr, ytr, Xva, yva, Xte, yte, n_boot=0)
    noise = fit_tree(Xtr[:, 1:], ytr, Xva[:, 1:], yva, Xte[:, 1:], yte, max_depths=(None,), min_samples_leafs=(1,), n_boot=0)
    ids = [f"t{i}" for i in range(yte.size)]
    spec = lambda f, c: ProbeSpec(f, "mean", None, None, c, None)  # noqa: E731
    return [ProbeRun(spec("sae", "tree"), noise, ids), ProbeRun(spec("sae", "logistic"), good, ids),
            ProbeRun(spec("hidden", "tree"), noise, ids), ProbeRun(spec("tfidf", "logistic"), good, ids)], yte


def test_runs_are_selected_on_validation_and_compared_paired(tmp_path: Path) -> None:
    runs, yte = _runs()
    assert runs[1].result.validation_macro_f1 > runs[0].result.validation_macro_f1
    assert best_run(runs, "sae") is runs[1]
    results = PartitionResults(table=pd.DataFrame(), runs=runs, majority_f1=0.3, train_ids=["a"])
    assert probe_checks(results).sae_macro_f1 == runs[1].result.metrics.macro_f1
    files = write_best_artifacts(results, pd.DataFrame({"label": yte, "label_name": yte.astype(str), "split": "test"}), tmp_path)
    assert {p.name for p, _ in files} >= {"best-sae.skops", "confusion-sae.png"}
    comps = {p.comparison: p for p in partition_comparisons(runs, yte, n_boot=300, seed=0)}
    assert comps["sae-hidden"].verdict == "SAE better" and comps["sae-hidden"].sae_win_share > 0.95
    assert comps["sae-tfidf"].verdict == "no difference" and comps["sae-tfidf"].diff == 0.0  # same predictions
    with pytest.raises(ValueError, match="other test rows"):
        partition_comparisons([runs[1], ProbeRun(runs[2].spec, runs[2].result, ["x"] * yte.size)], yte, n_boot=10, seed=0)


def test_paired_bootstrap_is_paired_and_exact() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    b = np.where(rng.random(300) < 0.6, y, rng.integers(0, 3, 300))
    diff, draws = paired_bootstrap(y, a, b, n_boot=200, seed=7)
    assert diff == pytest.approx(f1_score(y, a, average="macro") - f1_score(y, b, average="macro"))
    idx = np.random.default_rng(7).integers(0, 300, size=(100, 300))[3]  # the 4th resample of the first chunk
    ref = f1_score(y[idx], a[idx], average="macro") - f1_score(y[idx], b[idx], average="macro")
    assert draws[3] == pytest.approx(ref)
    rev_diff, rev = paired_bootstrap(y, b, a, n_boot=200, seed=7)
    np.testing.assert_allclose(rev, -draws)
    # a paired interval is narrower than two independent ones: b differs from a on few rows
    c = a.copy()
    c[:6] = (y[:6] + 1) % 3
    comp = paired_comparison("sae-hidden", y, ("a", a), ("c", c), n_boot=500, seed=0)
    assert comp.diff > 0 and comp.diff_ci_high - comp.diff_ci_low < 0.05
    assert verdict(0.01, 0.02) == "SAE better" and verdict(-0.02, -0.01) == "SAE worse" and verdict(-0.01, 0.01) == "no difference"


def test_overall_averages_tasks() -> None:
    rng = np.random.default_rng(2)
    parts = []
    for shift in (0.9, 0.7):
        y = rng.integers(0, 2, 200)
        a = np.where(rng.random(200) < shift, y, 1 - y)
        parts.append(paired_comparison("sae-hidden", y, ("a", a), ("y", y), n_boot=100, seed=0))
    tot = overall("sae-hidden", parts)
    assert tot is not None and tot.verdict == "SAE worse"
    assert tot.diff == pytest.approx(np.mean([p.diff for p in parts]))
    np.testing.assert_allclose(tot.draws, (parts[0].draws + parts[1].draws) / 2)
    assert overall("sae-tfidf", parts) is None


def test_ties_keep_the_partitions_own_pick_across_tables() -> None:
    """Equal validation scores: the row its partition selected (config order) wins, whatever the table order."""
    table = typed_results(pd.DataFrame([
        _row("sae", "tree", val=0.9, test=0.99, pooling="max", probe="sae/max/tree"),
        _row("sae", "logistic", val=0.9, test=0.60, probe="sae/mean/logistic"),
    ]))
    table.loc[1, "selected"] = True  # what run_probes marked (mean/logistic comes first in the config)
    assert best_rows(table).iloc[0]["probe"] == "sae/mean/logistic"
    from mosaic_dag.report.markdown import summary_table as _summary

    assert _summary(table).iloc[0]["macro_f1"] == 0.60


def test_results_written_before_the_analyzer_column_read_back_with_it(tmp_path: Path) -> None:
    """Older results files kept the TF-IDF analyzer in ``pooling``; they read back in the current schema."""
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.evaluation.schema import RESULT_COLUMNS

    old = _planted_table().drop(columns=["analyzer"], errors="ignore")
    old.loc[old["features"] == "tfidf", "pooling"] = "word"
    path = tmp_path / "old.parquet"
    old.to_parquet(path)
    table = results_table(None, [path])  # type: ignore[arg-type]  # files given: the config is not read
    assert list(table.columns) == RESULT_COLUMNS
    tfidf = table[table["features"] == "tfidf"].iloc[0]
    assert (tfidf["analyzer"], tfidf["pooling"]) == ("word", "")
    assert set(table.loc[table["features"] != "tfidf", "analyzer"]) == {""}
    assert set(table.loc[table["features"] == "sae", "pooling"]) == {"mean"}
