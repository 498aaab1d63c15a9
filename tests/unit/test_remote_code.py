"""A model that needs its own Python code: refused by default with a line that says so, warned about when trusted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mosaic_dag.lm import models
from mosaic_dag.config import ModelConfig
from mosaic_dag.errors import ModelError

CUSTOM_CONFIG = '''{"model_type": "mosaic-custom", "hidden_size": 8, "num_hidden_layers": 2,
 "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}'''
CUSTOM_CODE = '''from transformers import PretrainedConfig


class CustomConfig(PretrainedConfig):
    model_type = "mosaic-custom"
'''


def _custom_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(CUSTOM_CONFIG)
    (folder / "configuration_custom.py").write_text(CUSTOM_CODE)
    return folder


def test_refused_without_trust_naming_the_model_and_the_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the old message blamed this; it is not the cause
    folder = _custom_model(tmp_path / "custom")
    cfg = ModelConfig(name="cm", id=str(folder), layers=[0])
    with pytest.raises(ModelError) as err:
        models.model_dims(cfg, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"model 'cm': '{folder}' needs its own Python code") and "\n" not in msg
    assert "trust_remote_code: true" in msg and "HF_HUB_OFFLINE" not in msg
    # transformers' own refusal (a model whose config was not read first) gets the same line
    assert str(models._load_failure(cfg, ValueError(f"The repository {folder} contains custom code which must be "
                                                    "executed ... pass the argument `trust_remote_code=True`"),
                                    "could not be loaded")) == msg


def test_trusted_code_runs_after_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = _custom_model(tmp_path / "custom")
    cfg = ModelConfig(name="cm", id=str(folder), layers=[0], trust_remote_code=True)
    models._warned_remote.discard(str(folder))
    with caplog.at_level(logging.WARNING, logger="mosaic_dag.lm.models"):
        assert models.model_dims(cfg, tmp_path)[1:] == (8, 2)  # its configuration_custom.py ran
        models.model_dims(cfg, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "trust_remote_code is on" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "HF_HUB_OFFLINE" not in warnings[0] and "credentials" in warnings[0] and str(folder) in warnings[0]


def test_validate_refuses_before_any_compute(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import yaml

    from mosaic_dag.cli import main

    folder = _custom_model(tmp_path / "custom")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "cm", "id": str(folder), "layers": [0]}],
        "datasets": [{"name": "d", "path": "x.csv"}]}))
    assert main(["validate", "--config", str(tmp_path / "c.yaml")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("mosaic: error: model 'cm':") and "trust_remote_code: true" in line
