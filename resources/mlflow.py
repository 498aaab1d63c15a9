"""MLflow tracking: a local sqlite store under the data folder unless a URI is given."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dagster import AssetExecutionContext, ConfigurableResource

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.tracking import TrackedRun, default_tracking_uri, tracked_run


class MlflowResource(ConfigurableResource):
    """``tracking_uri`` empty: the config's mlflow.tracking_uri, else sqlite in the data folder."""

    tracking_uri: str = ""

    def uri(self, cfg: ExperimentConfig) -> str:
        return self.tracking_uri or cfg.mlflow.tracking_uri or default_tracking_uri(cfg.data_path)

    @contextlib.contextmanager
    def run(self, context: AssetExecutionContext, cfg: ExperimentConfig) -> Iterator[TrackedRun]:
        """One MLflow run per asset partition, tagged with the Dagster run, asset and partition."""
        asset = context.assets_def.key.to_user_string()
        partition = context.partition_key if context.has_partition_key else ""
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.asset_key": asset,
            "dagster.partition_key": str(partition),
            "mosaic.experiment": cfg.name,
        }
        name = f"{asset}/{partition}" if partition else asset
        with tracked_run(self.uri(cfg), cfg.mlflow.experiment, name, tags) as run:
            yield run
