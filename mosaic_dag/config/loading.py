"""Read and validate a YAML config; every error is one line naming the key path."""

from __future__ import annotations

from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mosaic_dag.config.experiment import ExperimentConfig
from mosaic_dag.errors import ConfigError


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key; check the spelling against README's config reference"
    elif kind == "literal_error":
        msg = msg.replace("Input should be", "allowed:")
    elif kind == "missing":
        msg = "required key is missing"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping; raise ConfigError with one line naming the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'models' and 'datasets'")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read a YAML config; ``None`` means the embedded demo config."""
    if path is None:
        text = importlib_resources.files("mosaic_dag.configs").joinpath("demo.yaml").read_text()
        return parse_config(yaml.safe_load(text), "demo.yaml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config with a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    cfg = parse_config(data, str(p))
    cfg._base_dir = p.resolve().parent
    return cfg


def config_text(path: str | Path | None) -> str:
    """The raw YAML, for hashing and for logging to MLflow."""
    if path is None:
        return importlib_resources.files("mosaic_dag.configs").joinpath("demo.yaml").read_text()
    return Path(path).read_text()
