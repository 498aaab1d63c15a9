"""The Dagster graph end to end on the tiny model: persistent instance, partitions, cache reuse, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from mosaic_dag.cli import main
from mosaic_dag.lm.models import forget_loaded
from mosaic_dag.runner import run_experiment
from tests.support.models import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_run_materializes_into_the_instance_and_reuses_the_cache(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    forget_loaded()
    config = tiny_config(tmp_path, tiny_model_dir, layers=[0, 2])
    first = run_experiment(config, progress=False, echo=lambda *_: None)
    hidden = [s for s in first.steps if s.asset == "hidden_states"]
    # one hidden_states partition per dataset: one forward pass served both layers (and both targets)
    assert len(hidden) == 1
    assert hidden[0].metadata["layers_computed"] == {"tiny": [0, 2]} and hidden[0].metadata["cache_hit"] is False
    assert first.forward_calls() > 0

    instance = DagsterInstance.get()
    assert sorted(instance.get_dynamic_partitions("target")) == ["tiny.L0.btk", "tiny.L2.btk"]
    assert instance.get_dynamic_partitions("dataset") == ["toy.en"]
    mat = instance.get_latest_materialization_event(AssetKey("hidden_states"))
    assert mat is not None and mat.asset_materialization.metadata["mlflow_run_id"].value

    second = run_experiment(config, progress=False, echo=lambda *_: None)
    assert second.forward_calls() == 0
    assert all(s.metadata["cache_hit"] for s in second.steps if s.asset == "hidden_states")

    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=first.tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=first.tracking_uri).get_experiment_by_name("mosaic").experiment_id])
    tags = {r.data.tags["dagster.asset_key"] for r in runs}
    assert {"dataset", "hidden_states", "sae", "sae_codes", "probes", "report"} <= tags
    assert all(r.data.tags["dagster.run_id"] for r in runs)
    assert all(r.data.tags["dagster.partition_key"] for r in runs if r.data.tags["dagster.asset_key"] != "report")
    assert any("tokens" in r.data.metrics for r in runs)


def test_cli_bad_config_exits_non_zero_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], dagster_home: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "m", "layers": [1], "layres": 2}], "datasets": [{"name": "d", "path": "x"}]}))
    assert main(["run", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models.0.layres" in err and "unknown key" in err


def test_cli_layer_out_of_range_fails_the_step_with_the_message(tmp_path: Path, tiny_model_dir: Path,
                                                                capsys: pytest.CaptureFixture[str], dagster_home: Path):
    forget_loaded()
    config = tiny_config(tmp_path, tiny_model_dir, layers=[9])
    assert main(["run", "--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layers [9] out of range" in err and "use 0..3" in err
    assert not list((tmp_path / "data" / "hidden").rglob("manifest.json")) if (tmp_path / "data" / "hidden").exists() else True


def test_dagster_definitions_validate():
    proc = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "passed validation" in proc.stderr + proc.stdout
