"""MLflow as its users expect, and Dagster ↔ MLflow links, checked through MLflow's client on the local sqlite
store and through the Dagster instance after one tiny run: model-training experiment, runs that wrap the compute,
hyper-parameters as params, scores (with CI bounds and per class) as metrics, provenance on every run, the SAE's
curve and cfg, embedded figures and numeric scores in Dagster metadata."""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import AssetKey, DagsterInstance

from mosaic_dag.config import load_config
from mosaic_dag.provenance import config_hash, resolved_yaml
from mosaic_dag.runner import run_experiment
from tests.support.models import tiny_config


def test_mlflow_runs_and_dagster_metadata_link_both_ways(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    from mlflow.tracking import MlflowClient

    config = tiny_config(tmp_path, tiny_model_dir, layers=[1])
    run_experiment(config, progress=False, echo=lambda *_: None)
    cfg = load_config(config)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("mosaic")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as training runs, not traces
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_asset: dict[str, list] = {}
    for r in runs:
        by_asset.setdefault(r.data.tags["dagster.asset_key"], []).append(r)
    # one run per asset partition, pooled features included
    assert {"dataset", "hidden_states", "sae", "sae_codes", "pooled_features", "probes", "report"} <= set(by_asset)
    digest = config_hash(cfg)
    for r in runs:
        tags = r.data.tags
        assert r.info.status == "FINISHED" and r.info.end_time >= r.info.start_time
        assert tags["mosaic.config_hash"] == digest and r.data.params["config_hash"] == digest
        assert tags["mosaic.code_version"] and all(tags[f"mosaic.version.{lib}"] for lib in
                                                   ("torch", "transformers", "sae-lens", "dagster", "mlflow"))
        assert tags["dagster.run_url"] == f"http://127.0.0.1:3000/runs/{tags['dagster.run_id']}"
        assert tags["dagster.run_url"] in tags["mlflow.note.content"]  # a clickable link in the run's description
        assert tags["mlflow.user"] and tags["mlflow.source.name"] == "mosaic"
        assert not tags["dagster.job_name"].startswith("__")
    # the resolved config, as what ran
    one = by_asset["probes"][0]
    text = Path(client.download_artifacts(one.info.run_id, "config/resolved.yaml", str(tmp_path / "dl"))).read_text()
    assert yaml.safe_load(text) == yaml.safe_load(resolved_yaml(cfg))

    probe = one.data
    for src in ("sae", "hidden", "tfidf"):
        assert probe.params[f"{src}.classifier"] and f"{src}.probe" in probe.params
        lo, f1, hi = (probe.metrics[f"{src}_macro_f1{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert lo <= f1 <= hi
        per_class = [k for k in probe.metrics if k.startswith(f"{src}_") and k.endswith("_recall")]
        assert len(per_class) == 2, per_class  # two classes in the toy data
    assert "sae_minus_hidden_macro_f1" in probe.metrics

    sae = by_asset["sae"][0]
    assert "trainer.lr" in sae.data.params and "lr" not in sae.data.metrics and "width" not in sae.data.metrics
    assert "dead_fraction" in sae.data.metrics
    listed = {a.path for a in client.list_artifacts(sae.info.run_id, "sae")}
    assert {"sae/training_curve.png", "sae/cfg.json"} <= listed
    assert not any(p.endswith(".safetensors") for p in listed)  # weights only behind mlflow.log_sae_weights
    report_files = {a.path for a in client.list_artifacts(by_asset["report"][0].info.run_id, "report")}
    assert {"report/index.html", "report/index.md", "report/sources.png", "report/sources.svg"} <= report_files

    # Dagster side: a clickable MLflow URL, numeric scores, figures embedded (no links to files the UI cannot serve)
    instance = DagsterInstance.get()
    mat = instance.get_latest_materialization_event(AssetKey("probes")).asset_materialization
    md = mat.metadata
    run_id = md["mlflow_run_id"].value
    assert md["mlflow_run"].value == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run_id}"
    assert isinstance(md["sae_macro_f1"].value, float) and isinstance(md["hidden_macro_f1"].value, float)
    assert abs(md["sae_macro_f1"].value - client.get_run(run_id).data.metrics["sae_macro_f1"]) < 1e-3
    assert isinstance(md["sae_minus_hidden_macro_f1"].value, float)
    assert md["figure"].value.startswith("![") and "(data:image/png;base64," in md["figure"].value
    assert "Selected SAE probe" in md["top_latents"].value and "activation_frequency" in md["top_latents"].value
    page = (cfg.data_path / "report" / "index.html").read_text()
    assert "What the SAE probes learned" in page and "<mark" in page  # firing tokens highlighted
    report = instance.get_latest_materialization_event(AssetKey("report")).asset_materialization.metadata
    text = report["report"].value
    assert text.count("(data:image/png;base64,") >= 3 and ".png)" not in text
    dagster_run = instance.get_run_by_id(client.get_run(run_id).data.tags["dagster.run_id"])
    assert dagster_run.tags["mosaic/config_hash"] == digest and dagster_run.tags["mosaic/version.torch"]
    assert not dagster_run.job_name.startswith("__")
