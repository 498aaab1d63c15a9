"""The results table's schema, in one place: its columns, the columns that key a row, the groups a
"best" configuration is selected within, and the dtypes every writer gives them.

One row per probe (``features`` = sae | hidden | tfidf | judge); a TF-IDF row names its ``analyzer``
(word | char) and leaves ``pooling`` empty; transfer rows have ``train_language != test_language``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["KEY_COLUMNS", "RESULT_COLUMNS", "RESULT_DEFAULTS", "SCORE_COLUMNS", "SELECTION_KEYS", "TABLE_COLUMNS",
           "result_row", "score_fields", "typed_results"]

RESULT_COLUMNS = [
    "model", "layer", "sae", "dataset", "language", "features", "pooling", "analyzer", "threshold", "top_n",
    "classifier", "k", "train_language", "test_language", "probe", "validation_macro_f1", "selected",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "auroc", "n_train", "n_test",
    "vs_hidden", "vs_tfidf", "vs_judge", "cost", "mlflow_run_id",
]
# what identifies a row: every setting up to the languages it was trained and tested on
KEY_COLUMNS = RESULT_COLUMNS[: RESULT_COLUMNS.index("test_language") + 1]
# one selection per feature source and task: across layers, SAEs and every probe setting
SELECTION_KEYS = ["dataset", "language", "train_language", "test_language", "features"]
# what the report's results table shows (the probe label and the MLflow run stay in the files)
TABLE_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in ("probe", "mlflow_run_id"))
# the scores of one fitted-and-scored probe in the transfer cells and the hard-condition curves
SCORE_COLUMNS: tuple[str, ...] = ("macro_f1", "ci_low", "ci_high", "accuracy", "auroc", "n_train", "n_test")
# the value of a column a row does not fill (and of one missing from a file written before it existed)
RESULT_DEFAULTS: dict[str, Any] = {
    "analyzer": "", "selected": False, "validation_macro_f1": math.nan, "vs_hidden": "", "vs_tfidf": "", "vs_judge": "",
    "cost": "", "mlflow_run_id": "",
}


def typed_results(table: pd.DataFrame) -> pd.DataFrame:
    """Nullable integers for optional settings (top_n, k): empty in CSV, never a -1 sentinel."""
    out = table.copy()
    for col in ("top_n", "k"):
        out[col] = pd.array([None if pd.isna(v) else int(v) for v in out[col]], dtype="Int64")
    for col in ("layer", "n_train", "n_test"):
        out[col] = out[col].astype("int64")
    out["threshold"] = out["threshold"].astype("float64")
    if "validation_macro_f1" in out.columns:
        out["validation_macro_f1"] = out["validation_macro_f1"].astype("float64")
        out["selected"] = out["selected"].astype(bool)
    return out


def result_row(**values: Any) -> dict[str, Any]:
    """One results row: ``values`` over the defaults of every column they leave out."""
    unknown = sorted(set(values) - set(RESULT_COLUMNS))
    if unknown:
        raise ValueError(f"results row: unknown columns {unknown}")
    return {c: RESULT_DEFAULTS.get(c, "") for c in RESULT_COLUMNS} | values


def score_fields(metrics: Any) -> dict[str, Any]:
    """``SCORE_COLUMNS`` of one probe's test metrics (a ``mosaic_dag.probes.metrics.Metrics``)."""
    return {"macro_f1": metrics.macro_f1, "ci_low": metrics.macro_f1_ci_low, "ci_high": metrics.macro_f1_ci_high,
            "accuracy": metrics.accuracy, "auroc": metrics.auroc, "n_train": int(metrics.n_train),
            "n_test": int(metrics.n_test)}
