"""The graph's asset checks: their specs and how each result is read off its step's outcome.

Each check is evaluated by the asset it guards (the numbers come from the same step), so a blocking
check stops every downstream step of that partition. ``sae_quality`` measures on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from assets.partitions import dataset_partitions, target_dataset_partitions, target_partitions
from mosaic_dag.data import datasets as ds
from mosaic_dag.data.leakage import shared_texts
from mosaic_dag.errors import MosaicError
from mosaic_dag.keys import DatasetKey
from mosaic_dag.data.step import read_frame
from mosaic_dag.sae.quality import check_quality, floors_of, partition_quality

# --------------------------------------------------------------------------- dataset

DATASET_CHECKS = [
    AssetCheckSpec("no_empty_texts", asset="dataset", description="every text has a non-space character",
                   partitions_def=dataset_partitions),
    AssetCheckSpec("class_counts", asset="dataset", description="every class appears in train and in test",
                   partitions_def=dataset_partitions),
    AssetCheckSpec("no_shared_texts", asset="dataset", blocking=True, partitions_def=dataset_partitions,
                   description="no text is in two splits (leakage): blocks every downstream step"),
]


def missing_classes(counts: dict[str, dict[str, int]], labels: list[str]) -> list[str]:
    """``split:label`` for every class absent from train or test."""
    return [f"{s}:{lab}" for s in ("train", "test") for lab in labels if counts.get(s, {}).get(lab, 0) == 0]


def dataset_results(frame: pd.DataFrame, key: DatasetKey) -> Iterator[AssetCheckResult]:
    shared = shared_texts(frame)
    empty = int((frame["text"].str.strip() == "").sum())
    missing = missing_classes(ds.class_counts(frame), sorted(frame["label_name"].unique()))
    yield AssetCheckResult(check_name="no_empty_texts", passed=empty == 0, metadata={"empty": empty})
    yield AssetCheckResult(check_name="class_counts", passed=not missing,
                           metadata={"missing": ", ".join(missing) or "none"})
    yield AssetCheckResult(check_name="no_shared_texts", passed=shared == 0, severity=AssetCheckSeverity.ERROR,
                           metadata={"shared_texts": shared},
                           description=None if shared == 0 else
                           f"dataset {key.key!r}: {shared} texts are in two splits; downstream steps are blocked")


# --------------------------------------------------------------------------- sae

SAE_CHECKS = [AssetCheckSpec("compatible", asset="sae", blocking=True, partitions_def=target_partitions,
                             description="the SAE reads this model's layer (d_in, hook, layer, model name); "
                             "blocks every downstream step")]


def compatible_result(result: Any, d_model: int) -> AssetCheckResult:
    """``result``: the SAE step's outcome (its info and the one-line mismatch, if any)."""
    return AssetCheckResult(check_name="compatible", passed=result.mismatch is None,
                            metadata={"d_in": int(result.info.d_in), "d_model": d_model,
                                      "hook": str(result.info.hook_name)},
                            description=result.mismatch and f"{result.mismatch} (downstream steps are blocked)")


# --------------------------------------------------------------------------- sae_codes


class SaeQualityError(MosaicError):
    """An SAE missed a configured floor on a dataset partition."""


SAE_QUALITY_CHECK = AssetCheckSpec(
    "sae_quality", asset="sae_codes", blocking=True, partitions_def=target_dataset_partitions,
    description="explained variance, dead fraction, L0 and loss recovered (reconstruction spliced into the "
    "forward) on this dataset meet the config's sae_quality floors; a failure stops pooling and probes",
)


def sae_quality_result(cfg, target, data, manifest, model, sae, sae_handle, hidden) -> AssetCheckResult:  # type: ignore[no-untyped-def]
    """Measure (or reuse the cached measurement) and compare with the floors; one line says why it failed.

    ``model``/``sae``: the step's resources; ``sae_handle`` and ``hidden``: its own upstream handles (the
    SAE it encoded with, the rows it read)."""
    if not cfg.sae_quality.enabled:
        return AssetCheckResult(check_name="sae_quality", passed=True, metadata={"result": "disabled in the config"})
    loaded = model.load(cfg, target.model)
    quality = partition_quality(cfg, target, data.dataset, data.language, loaded, manifest,
                                sae.load(cfg, target, sae_handle), read_frame(hidden.data))
    outcome = check_quality(quality, floors_of(cfg), name=target.sae)
    return AssetCheckResult(
        check_name="sae_quality", passed=outcome.passed, severity=AssetCheckSeverity.ERROR,
        description=outcome.line,
        metadata={"result": MetadataValue.text(outcome.line),
                  **{k: round(float(v), 5) for k, v in quality.as_dict().items()}},
    )


def stop_on_failure(result: AssetCheckResult) -> None:
    """Fail the step with the check's one line (Dagster's own blocking error only names the check)."""
    if not result.passed:
        raise SaeQualityError(f"{result.description}; lower the sae_quality floors in the config only if you "
                              "accept this SAE")


# --------------------------------------------------------------------------- probes

PROBE_CHECKS = [
    AssetCheckSpec("beats_majority", asset="probes", partitions_def=target_dataset_partitions,
                   description="best SAE macro-F1 above the majority-class baseline"),
    AssetCheckSpec("train_test_disjoint", asset="probes", partitions_def=target_dataset_partitions,
                   description="no id is both in train/validation and test"),
    AssetCheckSpec("same_test_rows", asset="probes", partitions_def=target_dataset_partitions,
                   description="every feature source scored on identical test ids"),
]


def probe_results(checks: Any) -> Iterator[AssetCheckResult]:
    """``checks``: the probes step's ``probe_checks`` numbers."""
    yield AssetCheckResult(check_name="beats_majority", passed=bool(checks.sae_macro_f1 > checks.majority_macro_f1),
                           metadata={"sae_macro_f1": float(np.round(checks.sae_macro_f1, 4)),
                                     "majority": round(checks.majority_macro_f1, 4)})
    yield AssetCheckResult(check_name="train_test_disjoint", passed=checks.train_test_overlap == 0,
                           metadata={"overlap": checks.train_test_overlap})
    yield AssetCheckResult(check_name="same_test_rows", passed=checks.distinct_test_sets == 1,
                           metadata={"distinct_test_sets": checks.distinct_test_sets})
