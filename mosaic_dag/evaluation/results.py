"""The results files: each partition's rows (and per-row test predictions) written as parquet, and
read back into one tidy table of the config's own partitions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.errors import MosaicError
from mosaic_dag.evaluation.schema import KEY_COLUMNS, RESULT_COLUMNS, RESULT_DEFAULTS
from mosaic_dag.keys import TargetKey, dataset_keys, targets
from mosaic_dag.paths import predictions_file, results_file, results_root
from mosaic_dag.storage import write_parquet

__all__ = ["iter_result_files", "read_results_file", "results_table", "write_results"]


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
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
        text = str(err).strip()
        reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise MosaicError(
            f"results file {str(path)!r} is not readable parquet ({reason}); delete it and run "
            "`mosaic run --config` again to recompute that partition"
        ) from None
    return frame.rename(columns={"val_macro_f1": "validation_macro_f1"})  # the column's name in older files


def read_partition_results(cfg: ExperimentConfig, target: TargetKey, dataset: str, language: str,
                           results_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One partition's probe rows (the probes step's file) and its per-row test predictions, if written."""
    pred_path = predictions_file(cfg, target, dataset, language)
    return read_results_file(Path(results_path)), pd.read_parquet(pred_path) if pred_path.exists() else None


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
            table[col] = RESULT_DEFAULTS.get(col, "")
    old_tfidf = (table["features"] == "tfidf") & (table["analyzer"].astype(str) == "")  # the analyzer sat in pooling
    if old_tfidf.any():
        table.loc[old_tfidf, "analyzer"] = table.loc[old_tfidf, "pooling"]
        table.loc[old_tfidf, "pooling"] = ""
    table = table.drop_duplicates(subset=KEY_COLUMNS, keep="first")
    return table.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)[RESULT_COLUMNS]
