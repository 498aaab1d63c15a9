"""The LM as a judge: option scoring, train-only shots, the majority baseline, and the graph step."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score

from mosaic_dag.config import parse_config
from mosaic_dag.errors import ConfigError
from mosaic_dag.evaluation.judge import class_options, judge_texts, pick_shots, shot_prefix
from mosaic_dag.probes.metrics import majority_baseline_f1
from tests.support.models import tiny_config


def _loaded(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_a_judge_that_always_answers_one_class_scores_the_majority_baseline(tiny_model_dir: Path):
    model, tok = _loaded(tiny_model_dir)
    # the second option continues the first, so its summed log-probability is always lower:
    # whatever the text, this judge answers class 0
    classes, options = np.array([0, 1]), [" hello", " hello hello hello"]
    texts = ["you are kind", "lovely day", "great post", "go away idiot", "stupid comment", "nice idea", "hello world"]
    y = np.array([0, 0, 0, 1, 1, 0, 0])
    run = judge_texts(model, tok, texts, "{text} answer", classes, options, batch_size=3)
    assert set(run.pred.tolist()) == {0}
    assert run.scores.shape == (len(texts), 2) and np.all(run.scores[:, 0] > run.scores[:, 1])
    assert np.isclose(f1_score(y, run.pred, average="macro"), majority_baseline_f1(y, y))
    # the other constant answer is not the majority baseline (the minority class)
    flipped = judge_texts(model, tok, texts, "{text} answer", np.array([1, 0]), options)
    assert f1_score(y, flipped.pred, average="macro") < majority_baseline_f1(y, y)
    # LM tokens: every prompt read once per option; a longer prompt costs more
    longer = judge_texts(model, tok, texts, "say {text} answer now", classes, options)
    assert longer.lm_tokens == run.lm_tokens + 2 * 2 * len(texts)


def test_shots_are_train_rows_balanced_and_seeded():
    labels = np.array([0] * 20 + [1] * 5)
    picked = pick_shots(labels, 4, seed=3)
    assert len(set(picked.tolist())) == 4
    assert sorted(labels[picked].tolist()) == [0, 0, 1, 1]  # classes in turn
    assert np.array_equal(picked, pick_shots(labels, 4, seed=3))
    assert pick_shots(labels, 0, seed=3).size == 0
    assert pick_shots(labels, 50, seed=0).size == 25  # never more shots than rows
    assert shot_prefix("T: {text}\nA:", ["a b", "c"], [" x", " y"]) == "T: a b\nA: x\n\nT: c\nA: y\n\n"


def test_every_class_needs_an_option():
    assert class_options({0: "ok", 1: "toxic"}, {"toxic": " yes", "ok": " no"})[1] == [" no", " yes"]
    with pytest.raises(ConfigError, match="no answer for the classes \\['toxic'\\]"):
        class_options({0: "ok", 1: "toxic"}, {"ok": " no", "spam": " yes"})


def test_judge_config_is_strict(tmp_path: Path, tiny_model_dir: Path):
    raw = yaml.safe_load(tiny_config(tmp_path, tiny_model_dir).read_text())
    assert parse_config(raw).judge.enabled is False  # opt-in
    with pytest.raises(ConfigError, match="judge: .*needs 'options'"):
        parse_config(raw | {"judge": {"enabled": True}})
    with pytest.raises(ConfigError, match="judge.template: .*must contain \\{text\\}|judge: template"):
        parse_config(raw | {"judge": {"template": "no slot", "options": {"ok": " a", "toxic": " b"}}})
    with pytest.raises(ConfigError, match="judge.model"):
        parse_config(raw | {"judge": {"enabled": True, "model": "nope", "options": {"ok": " a", "toxic": " b"}}})
    with pytest.raises(ConfigError, match="judge.shot: unknown key"):
        parse_config(raw | {"judge": {"shot": 2}})


def test_judge_in_the_graph_results_comparisons_and_report(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    from mosaic_dag.report.build import comparisons_table
    from mosaic_dag.config import load_config
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.data.step import read_dataset
    from mosaic_dag.runner import run_experiment

    path = tiny_config(tmp_path, tiny_model_dir, layers=[1])
    raw = yaml.safe_load(path.read_text())
    raw["judge"] = {"enabled": True, "template": "{text} is", "options": {"ok": " kind", "toxic": " stupid"}, "shots": 2}
    path.write_text(yaml.safe_dump(raw))
    summary = run_experiment(path, progress=False, echo=lambda *_: None)
    assert "judge" in {s.asset for s in summary.steps}
    cfg = load_config(path)
    table = results_table(cfg)
    judge = table[table["features"] == "judge"]
    assert len(judge) == 1
    row = judge.iloc[0]
    sae = table[(table["features"] == "sae") & table["selected"]].iloc[0]
    assert row["n_test"] == sae["n_test"] and row["n_train"] == 2 and row["probe"] == "judge/2-shot"
    assert row["macro_f1_ci_low"] <= row["macro_f1"] <= row["macro_f1_ci_high"]
    assert row["vs_judge"].split(":")[0] in {"SAE better", "SAE worse", "no difference"}
    assert "judge" in row["cost"] and "features+probe" in row["cost"]
    # the paired difference is against the validation-selected SAE probe, on the same test ids
    preds = pd.read_parquet(cfg.data_path / "predictions" / "tiny.L1.btk" / "judge.toy.en.parquet")
    frame = read_dataset(cfg, "toy", "en").frame
    assert sorted(preds["id"]) == sorted(frame[frame["split"] == "test"]["id"])
    comp = comparisons_table(cfg)
    pair = comp[(comp["scope"] == "partition") & (comp["comparison"] == "sae-judge")].iloc[0]
    assert pair["sae_probe"] == sae["probe"] and np.isclose(pair["sae_macro_f1"], sae["macro_f1"])
    assert np.isclose(pair["other_macro_f1"], row["macro_f1"])
    assert "judge/2-shot" in (cfg.data_path / "report" / "index.md").read_text()
