"""MLflow tracking: a local sqlite store under the data folder unless a URI is given."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dagster import AssetExecutionContext, ConfigurableResource, MetadataValue

from mosaic_dag.config import ExperimentConfig
from mosaic_dag.tracking import TrackedRun, default_tracking_uri, tracked_run


def dagster_run_url(cfg: ExperimentConfig, run_id: str) -> str:
    return f"{cfg.mlflow.dagster_url.rstrip('/')}/runs/{run_id}"


def run_metadata(run: TrackedRun) -> dict[str, Any]:
    """Dagster output metadata that links to the MLflow run (a clickable URL, and its id)."""
    return {"mlflow_run_id": run.run_id, "mlflow_run": MetadataValue.url(run.url)}


def _tag_dagster_run(context: AssetExecutionContext, tags: dict[str, str]) -> None:
    """Provenance as Dagster run tags (``mosaic/config_hash`` …), also on runs the automation sensor launches."""
    dagster_tags = {k.replace("mosaic.", "mosaic/", 1): v[:255] for k, v in tags.items() if k.startswith("mosaic.")}
    current = context.instance.get_run_by_id(context.run_id)
    missing = {k: v for k, v in dagster_tags.items() if current is None or current.tags.get(k) != v}
    if missing:
        context.instance.add_run_tags(context.run_id, missing)


class MlflowResource(ConfigurableResource):
    """``tracking_uri`` empty: the config's mlflow.tracking_uri, else sqlite in the data folder."""

    tracking_uri: str = ""

    def uri(self, cfg: ExperimentConfig) -> str:
        return self.tracking_uri or cfg.mlflow.tracking_uri or default_tracking_uri(cfg.data_path)

    @contextlib.contextmanager
    def run(self, context: AssetExecutionContext, cfg: ExperimentConfig) -> Iterator[TrackedRun]:
        """One MLflow run per asset partition, around the step's compute, tagged with the Dagster run (and its
        URL), asset, partition and provenance (config hash, code version, library versions); the resolved
        config is logged as ``config/resolved.yaml``."""
        from mosaic_dag.provenance import provenance, resolved_yaml

        asset = context.assets_def.key.to_user_string()
        partition = context.partition_key if context.has_partition_key else ""
        url = dagster_run_url(cfg, context.run_id)
        prov = provenance(cfg)
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.run_url": url,
            "dagster.job_name": context.job_name,
            "dagster.asset_key": asset,
            "dagster.partition_key": str(partition),
            "mosaic.experiment": cfg.name,
            **prov,
        }
        name = f"{asset}/{partition}" if partition else asset
        description = (f"Dagster asset `{asset}`{f' partition `{partition}`' if partition else ''}, "
                       f"run [{context.run_id}]({url}) (job `{context.job_name}`).\n\n"
                       f"Config `{cfg.name}` (hash `{prov['mosaic.config_hash']}`), code `{prov['mosaic.code_version']}`.")
        _tag_dagster_run(context, prov)
        with tracked_run(self.uri(cfg), cfg.mlflow.experiment, name, tags, description=description,
                         ui_url=cfg.mlflow.ui_url) as run:
            run.log_params({"config_hash": prov["mosaic.config_hash"], "asset": asset, "partition": partition})
            run.log_text(resolved_yaml(cfg), "config/resolved.yaml")
            yield run
