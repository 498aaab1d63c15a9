"""The Dagster graph end to end on the tiny model: persistent instance, partitions, cache reuse, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from mosaic_dag.cli import main
from mosaic_dag.runner import run_experiment
from tests.support.models import FAST_SAE, fast_config, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_run_materializes_into_the_instance_and_reuses_the_cache(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2], saes=[{**FAST_SAE, "name": "btk"}])
    raw = yaml.safe_load(config.read_text())
    raw["classification"]["tfidf"] = ["word"]  # the TF-IDF probe's seconds are asserted below
    config.write_text(yaml.safe_dump(raw))
    first = run_experiment(config, progress=False, echo=lambda *_: None)
    hidden = [s for s in first.steps if s.asset == "hidden_states"]
    # one hidden_states partition per dataset: one forward pass served both layers (and both targets)
    assert len(hidden) == 1
    assert hidden[0].metadata["layers_computed"] == {"tiny": [0, 2]} and hidden[0].metadata["cache_hit"] is False
    assert first.forward_calls() > 0
    # each materialization also has its own step's seconds (Dagster's step events), within its run's
    assert all(0 < s.step_seconds <= s.seconds for s in first.steps)
    probes = [s for s in first.steps if s.asset == "probes"]
    assert probes and all(s.metadata["seconds_logistic"] > 0 and s.metadata["seconds_tfidf"] > 0 for s in probes)

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


def test_model_and_sae_load_once_across_the_partition_runs_of_one_process(tmp_path: Path, tiny_model_dir: Path,
                                                                          dagster_home: Path, monkeypatch: pytest.MonkeyPatch):
    """`mosaic run` runs every partition as its own Dagster run: the model and SAE resources keep their loads
    across those runs (the caches are the resources', not the process's)."""
    import mosaic_dag.lm.models as models
    import mosaic_dag.sae.resolve as resolve

    loads = {"model": 0, "sae": 0}
    real_model, real_sae = models.load_model, resolve.load_sae

    def count_model(*args, **kwargs):  # type: ignore[no-untyped-def]
        loads["model"] += 1
        return real_model(*args, **kwargs)

    def count_sae(*args, **kwargs):  # type: ignore[no-untyped-def]
        loads["sae"] += 1
        return real_sae(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", count_model)
    monkeypatch.setattr(resolve, "load_sae", count_sae)
    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2])
    raw = yaml.safe_load(config.read_text())
    # the quality check needs the model again in every sae_codes run (loss recovered); no floors to meet
    raw["sae_quality"] = {"enabled": True, "texts": 8, "min_explained_variance": None, "min_loss_recovered": None}
    config.write_text(yaml.safe_dump(raw))
    summary = run_experiment(config, progress=False, echo=lambda *_: None)
    runs_needing_the_model = [s for s in summary.steps if s.asset in ("hidden_states", "sae_codes")]
    assert len(runs_needing_the_model) == 3  # one hidden_states run, one sae_codes run per target
    assert loads == {"model": 1, "sae": 2}  # one SAE per target, loaded once after training


def test_cli_bad_config_exits_non_zero_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], dagster_home: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "m", "layers": [1], "layres": 2}], "datasets": [{"name": "d", "path": "x"}]}))
    assert main(["run", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models.0.layres" in err and "unknown key" in err


def test_cli_layer_out_of_range_fails_the_step_with_the_message(tmp_path: Path, tiny_model_dir: Path,
                                                                capsys: pytest.CaptureFixture[str], dagster_home: Path):
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
