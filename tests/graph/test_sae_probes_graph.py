"""SAE → codes → pooled → probes through Dagster on the tiny model; the release sensor; the results CLI."""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from mosaic_dag.cli import main
from mosaic_dag.sae.codes import CodesStore
from mosaic_dag.sae.resolve import load_target_sae
from mosaic_dag.handles import SaeHandle
from mosaic_dag.config import load_config
from mosaic_dag.evaluation.results import results_table
from mosaic_dag.evaluation.schema import RESULT_COLUMNS
from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.keys import parse_target
from mosaic_dag.runner import run_experiment
from tests.support.models import TINY_SAE, tiny_config
from tests.support.sae import make_sae

FAST = {"poolings": ["mean", "topn_count"], "thresholds": [None, 0.0], "top_n": [4],
        "classifiers": ["logistic", "ksparse"], "k": [1, 5], "tfidf": ["word"], "bootstrap": 50}


def _config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tiny_config(tmp_path, model_dir, layers=[1], saes=[TINY_SAE])
    data = yaml.safe_load(path.read_text())
    data["classification"] = FAST
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_graph_end_to_end_and_deterministic(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    config = _config(tmp_path / "a", tiny_model_dir)
    summary = run_experiment(config, progress=False, echo=lambda *_: None)
    assets = {s.asset for s in summary.steps}
    assert assets == {"dataset", "hidden_states", "sae", "sae_codes", "pooled_features", "probes", "conditions",
                      "transfer", "report"}
    cfg = load_config(config)
    table = results_table(cfg)
    assert list(table.columns) == RESULT_COLUMNS
    assert set(table["features"]) == {"sae", "hidden", "tfidf"}
    assert table["n_test"].nunique() == 1  # every source scored on the same test rows
    assert (table["mlflow_run_id"] != "").all()
    # one validation-selected row per source and partition; its paired verdicts sit on the SAE row
    in_lang = table[table["train_language"] == table["test_language"]]
    assert in_lang["validation_macro_f1"].notna().all()
    chosen = in_lang[in_lang["selected"]]
    assert sorted(chosen["features"]) == ["hidden", "sae", "tfidf"]
    for _, row in chosen.iterrows():
        same = in_lang[in_lang["features"] == row["features"]]
        assert row["validation_macro_f1"] == same["validation_macro_f1"].max()
    sae_row = chosen[chosen["features"] == "sae"].iloc[0]
    assert sae_row["vs_hidden"].split(":")[0] in {"SAE better", "no difference", "SAE worse"}
    from mosaic_dag.report.build import comparisons_table
    from mosaic_dag.paths import predictions_file

    preds = pd.read_parquet(predictions_file(cfg, parse_target("tiny.L1.btk"), "toy", "en"))
    assert len(preds) == int(table["n_test"].iloc[0]) and set(in_lang["probe"]) <= set(preds.columns)
    comp = comparisons_table(cfg)
    assert set(comp["scope"]) == {"partition", "task", "overall"}
    assert set(comp["comparison"]) == {"sae-hidden", "sae-tfidf"}
    assert ((comp["diff_ci_low"] <= comp["diff"]) & (comp["diff"] <= comp["diff_ci_high"])).all()
    report_md = (cfg.data_path / "report" / "index.md").read_text()
    assert "paired, selected configurations" in report_md
    # sparse codes on disk, far smaller than dense, equal to sae.encode on the cached activations
    codes_step = next(s for s in summary.steps if s.asset == "sae_codes")
    store = CodesStore(Path(codes_step.metadata["path"]))
    man = store.manifest()
    assert man["bytes"] < man["dense_fp16_bytes"] / 3
    hidden = HiddenCache(Path(man["hidden_cache"]))
    sae_step = next(s for s in summary.steps if s.asset == "sae")
    sae = load_target_sae(cfg, parse_target("tiny.L1.btk"), SaeHandle("tiny.L1.btk", "train", "", sae_step.metadata["path"]))
    import torch

    for shard, codes in zip(hidden.iter_shards(), store.iter_shards()):
        assert sp.issparse(codes.codes)
        with torch.inference_mode():
            ref = sae.encode(torch.from_numpy(shard.acts.astype(np.float32))).numpy()
        ref[~shard.real_mask] = 0.0
        np.testing.assert_allclose(codes.codes.toarray(), ref, rtol=1e-3, atol=1e-3)
    # SAE trained on TRAIN texts only: its metadata says so and the asset reports training metrics
    assert sae_step.metadata["cache_hit"] is False and sae_step.metadata["width"] == 128
    # a second run in another folder gives the identical table (seeds fixed), MLflow ids aside
    config_b = _config(tmp_path / "b", tiny_model_dir)
    run_experiment(config_b, progress=False, echo=lambda *_: None)
    other = results_table(load_config(config_b))
    cols = [c for c in RESULT_COLUMNS if c != "mlflow_run_id"]
    pd.testing.assert_frame_equal(table[cols], other[cols])


def test_results_cli_formats(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path, capsys):
    config = _config(tmp_path, tiny_model_dir)
    assert main(["run", "--config", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "selected probe per feature source (chosen on validation" in out and "| sae |" not in out.split("\n")[0]
    assert "sae-hidden" in out and "overall" in out
    assert main(["results", "--config", str(config), "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0] == ",".join(RESULT_COLUMNS)
    assert main(["results", "--config", str(config), "--format", "parquet", "--output", str(tmp_path / "r.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == len(csv.strip().splitlines()) - 1


def test_mismatched_sae_fails_before_any_forward_pass(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path,
                                                      capsys):
    sae = make_sae("jumprelu", d_in=32, width=64, hook_name="model.layers.1", model_name="tiny-gemma3")
    sae.save_model(str(tmp_path / "wrong_sae"))
    path = tiny_config(tmp_path, tiny_model_dir, layers=[1],
                       saes=[{"origin": "local", "path": str(tmp_path / "wrong_sae"), "name": "wrong"}])
    assert main(["run", "--config", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sae d_in=32 does not match model tiny-gemma3 d_model=64" in err
    assert not list((tmp_path / "data").rglob("manifest.json"))  # no forward pass ran


def test_bad_sae_is_stopped_by_the_quality_check(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path,
                                                capsys):
    """A random SAE that fits the model's shape misses the default floors: codes are written, no probe runs."""
    sae = make_sae("jumprelu", d_in=64, width=64, hook_name="model.layers.1", model_name="tiny-gemma3")
    sae.save_model(str(tmp_path / "random_sae"))
    path = tiny_config(tmp_path, tiny_model_dir, layers=[1],
                       saes=[{"origin": "local", "path": str(tmp_path / "random_sae"), "name": "random"}])
    data = yaml.safe_load(path.read_text())
    data["classification"] = FAST | {"poolings": ["mean"], "thresholds": [None], "classifiers": ["logistic"]}
    data["sae_quality"] = {"enabled": True}  # the default floors (tiny_config turns them off)
    path.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mosaic: error: sae random: explained_variance ") and "(must be >= 0.5)" in err
    assert list((tmp_path / "data" / "codes").rglob("manifest.json"))  # the asset itself materialized
    assert not (tmp_path / "data" / "results").exists()  # the blocking check stopped everything downstream
    measured = next((tmp_path / "data" / "quality").rglob("*.json"))
    assert '"loss_recovered"' in measured.read_text()


