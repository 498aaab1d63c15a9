"""Provenance: the resolved config is what ran (defaults filled in), its hash follows its content, secrets in
it are redacted, and the code and library versions are named."""

from __future__ import annotations

import yaml

from mosaic_dag.config import parse_config
from mosaic_dag.provenance import LIBRARIES, config_hash, provenance, resolved_yaml


def _cfg(**extra):  # type: ignore[no-untyped-def]
    return parse_config({"models": [{"name": "m", "layers": [1]}], "datasets": [{"name": "d", "path": "x.csv"}], **extra})


def test_resolved_config_hash_and_versions() -> None:
    a, b = _cfg(), _cfg(classification={"seed": 1})
    text = yaml.safe_load(resolved_yaml(a))
    assert text["classification"]["seed"] == 0 and text["models"][0]["saes"]  # defaults are part of what ran
    assert config_hash(a) == config_hash(_cfg()) != config_hash(b)
    prov = provenance(a)
    assert prov["mosaic.config_hash"] == config_hash(a)
    assert prov["mosaic.code_version"].startswith(("git:", "mosaic-dag ", "unknown"))
    assert {f"mosaic.version.{lib}" for lib in LIBRARIES} <= set(prov)
    assert prov["mosaic.version.torch"] != "not installed"


def test_credentials_never_reach_the_logged_config() -> None:
    cfg = _cfg(mlflow={"tracking_uri": "postgresql://alice:s3cret@db.example:5432/mlflow"})
    text = resolved_yaml(cfg)
    assert "s3cret" not in text and "alice" not in text and "db.example:5432/mlflow" in text
