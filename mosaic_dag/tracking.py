"""MLflow tracking: one MLflow run per asset partition, tagged so Dagster and MLflow link both ways."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_SECRET_RE = re.compile(
    r"(secret|passw(or)?d|api_?key|credential|private_?key|access_?key|auth)|((^|_)(hf_|access_|auth_)?token(_path)?$)"
)


def default_tracking_uri(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'mlflow.db').resolve()}"


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as strings, with anything that looks like a secret left out."""
    out = {}
    for k, v in params.items():
        if _SECRET_RE.search(k.lower()):  # batch_tokens is a count, hf_token is a secret
            continue
        out[k] = str(v)[:500]
    return out


@dataclass
class TrackedRun:
    """A thin handle over an MLflow run; metrics that are not finite are skipped, not crashed on."""

    client: Any
    run_id: str
    tracking_uri: str
    experiment_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in safe_params(params).items():
            self.client.log_param(self.run_id, k, v)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self.client.log_metric(self.run_id, k, float(v), step=step or 0)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @property
    def url(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"


@contextlib.contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local sqlite store; a no-op for remote tracking servers."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(tracking_uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def tracked_run(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Start an MLflow run, end it FINISHED or FAILED with the block."""
    from mlflow.tracking import MlflowClient

    with _store_lock(tracking_uri):  # two processes creating one sqlite store at once would race its migration
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            artifacts = None
            if tracking_uri.startswith("sqlite:///"):
                artifacts = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=artifacts)
        run = client.create_run(exp_id, run_name=name, tags=dict(tags))
    handle = TrackedRun(client, run.info.run_id, tracking_uri, exp_id)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def log_curve(run: TrackedRun, curve: list[dict[str, float]]) -> None:
    """A training curve as MLflow step metrics (``train/loss``, ``train/l0``, ``train/dead_fraction`` …)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"train/{k}", float(v), now, int(point.get("step", 0)))
               for point in curve for k, v in point.items() if k != "step" and v is not None and math.isfinite(float(v))]
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        run.client.log_batch(run.run_id, metrics=metrics[start : start + 900])
