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


# the tag MLflow's UI reads to open an experiment as model training (runs, params, metrics), not GenAI traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


@dataclass
class TrackedRun:
    """A thin handle over an MLflow run; metrics that are not finite are skipped, not crashed on."""

    client: Any
    run_id: str
    tracking_uri: str
    experiment_id: str
    ui_url: str = ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in safe_params(params).items():
            self.client.log_param(self.run_id, k, v)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self.client.log_metric(self.run_id, k, float(v), step=step or 0)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    @property
    def url(self) -> str:
        """The run's page in the MLflow UI (``ui_url`` + the UI's own route)."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


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


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


@contextlib.contextmanager
def tracked_run(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str], *,
                description: str = "", ui_url: str = "") -> Iterator[TrackedRun]:
    """Start an MLflow run, end it FINISHED or FAILED with the block (so its duration is the block's).

    The experiment is tagged as model training; the run carries MLflow's own user, source and (when
    ``tags`` name one) git-commit tags, and ``description`` as its note (markdown, shown on the run page)."""
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
            exp_id = client.create_experiment(experiment, artifact_location=artifacts,
                                              tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if exp is not None and exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        own = {"mlflow.user": _user(), "mlflow.source.name": "mosaic", "mlflow.source.type": "LOCAL"}
        commit = str(tags.get("mosaic.code_version", ""))
        if commit.startswith("git:"):
            own["mlflow.source.git.commit"] = commit.removeprefix("git:").removesuffix("+dirty")
        if description:
            own["mlflow.note.content"] = description
        run = client.create_run(exp_id, run_name=name, tags=own | dict(tags))
    handle = TrackedRun(client, run.info.run_id, tracking_uri, exp_id, ui_url)
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


# what an SAE's training metrics hold that is a setting, not a measurement: MLflow params, not metrics
_SAE_SETTINGS = ("architecture", "inference_architecture", "d_in", "width", "k", "sparsity_coefficient", "lr",
                 "lr_warm_up_steps", "lr_decay_steps", "aux_loss_coefficient", "dead_feature_window_steps", "batch_size",
                 "seed", "steps", "training_tokens", "available_tokens", "model_name", "hook_name", "layer", "eval_on",
                 "epochs", "tokens_per_latent")


def split_sae_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """An SAE's metrics file as (settings -> MLflow params, finite measurements -> MLflow metrics); the curve
    is logged as step metrics by ``log_curve``."""
    params = {k: v for k, v in metrics.items() if k in _SAE_SETTINGS and v is not None}
    values = {k: float(v) for k, v in metrics.items()
              if k not in _SAE_SETTINGS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return params, values
