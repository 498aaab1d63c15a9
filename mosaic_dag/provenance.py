"""What produced a number: the resolved config (YAML + hash), the code's git commit or package version,
and the versions of the libraries that compute it. Logged on every MLflow run, tagged on Dagster runs and
printed in the report's footer."""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from mosaic_dag.config import ExperimentConfig

__all__ = ["LIBRARIES", "code_version", "config_hash", "library_versions", "provenance", "resolved_yaml"]

LIBRARIES = ("torch", "transformers", "sae-lens", "dagster", "mlflow", "scikit-learn")


_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


def _redacted(value: Any) -> Any:
    """Credentials in URLs (``postgresql://user:pw@host``) and secret-looking keys are never logged."""
    from mosaic_dag.tracking import safe_params

    if isinstance(value, dict):
        kept = safe_params({k: "" for k in value})
        return {k: _redacted(v) if k in kept else "<redacted>" for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\1<redacted>@", value)
    return value


def resolved_yaml(cfg: ExperimentConfig) -> str:
    """The config after validation and defaults, as YAML (what ran, not only what was written), secrets redacted."""
    return yaml.safe_dump(_redacted(cfg.model_dump(mode="json")), sort_keys=True, allow_unicode=True)


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(resolved_yaml(cfg).encode()).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """``git:<commit>[+dirty]`` of the checkout this package runs from, else ``mosaic-dag <version>``."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        if commit:
            return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"mosaic-dag {metadata.version('mosaic-dag')}"
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def provenance(cfg: ExperimentConfig) -> dict[str, str]:
    """Flat ``mosaic.*`` keys: usable as MLflow tags, Dagster run tags and the report footer."""
    out = {"mosaic.config_name": cfg.name, "mosaic.config_hash": config_hash(cfg), "mosaic.code_version": code_version()}
    out |= {f"mosaic.version.{lib}": v for lib, v in library_versions().items()}
    return out
