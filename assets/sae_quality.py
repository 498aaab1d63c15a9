"""The blocking ``sae_quality`` check of ``sae_codes``: an SAE below the configured floors stops the partition."""

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from assets.partitions import target_dataset_partitions
from mosaic_dag.sae.resolve import load_target_sae
from mosaic_dag.errors import MosaicError
from mosaic_dag.data.step import read_frame
from mosaic_dag.sae.quality import check_quality, floors_of, partition_quality


class SaeQualityError(MosaicError):
    """An SAE missed a configured floor on a dataset partition."""

SAE_QUALITY_CHECK = AssetCheckSpec(
    "sae_quality", asset="sae_codes", blocking=True, partitions_def=target_dataset_partitions,
    description="explained variance, dead fraction, L0 and loss recovered (reconstruction spliced into the "
    "forward) on this dataset meet the config's sae_quality floors; a failure stops pooling and probes",
)


def sae_quality_result(cfg, target, data, manifest, model, sae, hidden) -> AssetCheckResult:  # type: ignore[no-untyped-def]
    """Measure (or reuse the cached measurement) and compare with the floors; one line says why it failed.

    ``sae`` and ``hidden``: the step's own upstream handles (the SAE it encoded with, the rows it read)."""
    if not cfg.sae_quality.enabled:
        return AssetCheckResult(check_name="sae_quality", passed=True, metadata={"result": "disabled in the config"})
    loaded = model.load(cfg, target.model)
    quality = partition_quality(cfg, target, data.dataset, data.language, loaded, manifest,
                                load_target_sae(cfg, target, sae), read_frame(hidden.data))
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
