"""Transfer across datasets of one task: the label mapping, the matrices, the config and the graph step."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mosaic_dag.config import load_config, parse_config
from mosaic_dag.errors import ConfigError
from mosaic_dag.evaluation.tasks import common_labels
from mosaic_dag.evaluation.transfer_matrix import Split, offdiag_mean, tfidf_transfer_matrix, transfer_matrix
from tests.support.models import SHARED_DATA, TINY_SAE, WORDS, mlflow_store

CLASSES = ["not_offensive", "offensive"]
A_MAP = {"ok": "not_offensive", "toxic": "offensive"}
B_MAP = {"neither": "not_offensive", "hate": "offensive", "insult": "offensive"}
B_FLIPPED = {"neither": "offensive", "hate": "not_offensive", "insult": "not_offensive"}


def _names(rng: np.random.Generator, n: int, kind: str) -> list[str]:
    good, bad = ("ok", ["toxic"]) if kind == "a" else ("neither", ["hate", "insult"])
    return [good if i % 2 == 0 else bad[int(rng.integers(len(bad)))] for i in range(n)]


def _split(rng: np.random.Generator, names: list[str], mapping: dict[str, str], shift: float) -> Split:
    """Features whose first column carries the TRUE class (offensive or not), as the same concept would."""
    truth = common_labels(names, A_MAP | B_MAP, CLASSES)
    X = rng.normal(size=(len(names), 6)) + shift
    X[:, 0] += 3.0 * (2 * truth - 1)
    y = common_labels(names, mapping, CLASSES)
    n = len(names)
    tr, va = int(0.6 * n), int(0.8 * n)
    return Split(X[:tr], y[:tr], X[tr:va], y[tr:va], X[va:], y[va:])


def test_common_labels_map_and_refuse_gaps():
    assert common_labels(["hate", "neither", "insult"], B_MAP, CLASSES).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="no common class for the labels \\['spam'\\]"):
        common_labels(["hate", "spam"], B_MAP, CLASSES)
    with pytest.raises(ValueError, match="not among the task's classes"):
        common_labels(["hate"], {"hate": "rude"}, CLASSES)


def test_a_flipped_label_mapping_collapses_the_off_diagonal():
    rng = np.random.default_rng(0)
    a, b = _names(rng, 200, "a"), _names(rng, 200, "b")
    right = transfer_matrix({"a": _split(rng, a, A_MAP, 0.0), "b": _split(rng, b, B_MAP, 0.5)}, n_boot=20)
    flipped = transfer_matrix({"a": _split(rng, a, A_MAP, 0.0), "b": _split(rng, b, B_FLIPPED, 0.5)}, n_boot=20)
    assert offdiag_mean(right.matrix) > 0.9
    assert offdiag_mean(flipped.matrix) < 0.15
    # each dataset on its own is as learnable either way: only the shared label space broke
    for m in (right.matrix, flipped.matrix):
        assert min(m.loc["a", "a"], m.loc["b", "b"]) > 0.9
    ci = right.long
    assert (ci["ci_low"] <= ci["macro_f1"]).all() and (ci["macro_f1"] <= ci["ci_high"]).all()


def test_flipped_mapping_collapses_tfidf_too():
    def texts(kind: str, mapping: dict[str, str]):
        rng = np.random.default_rng(1 if kind == "a" else 2)
        names = _names(rng, 120, kind)
        words = {"not_offensive": ["kind", "lovely", "thank", "friend"], "offensive": ["stupid", "idiot", "hate", "bad"]}
        truth = common_labels(names, A_MAP | B_MAP, CLASSES)
        t = [f"{words[CLASSES[c]][i % 4]} {WORDS[int(rng.integers(20))]} {WORDS[int(rng.integers(20))]}"
             for i, c in enumerate(truth)]
        y = common_labels(names, mapping, CLASSES)
        return (t[:70], y[:70], t[70:90], y[70:90], t[90:], y[90:])

    right = tfidf_transfer_matrix({"a.en": texts("a", A_MAP), "b.en": texts("b", B_MAP)}, n_boot=20,
                                  languages={"a.en": "en", "b.en": "en"})
    flipped = tfidf_transfer_matrix({"a.en": texts("a", A_MAP), "b.en": texts("b", B_FLIPPED)}, n_boot=20)
    assert offdiag_mean(right.matrix) > 0.9 and offdiag_mean(flipped.matrix) < 0.15


def _raw(tmp_path: Path, datasets: list[dict]) -> dict:
    return {"name": "t", "data_dir": str(tmp_path / "data"), "models": [{"name": "m", "layers": [1]}],
            "datasets": datasets}


def test_task_config_is_checked(tmp_path: Path):
    a = {"name": "a", "path": "a.csv", "task": "off", "task_classes": {"ok": "no", "toxic": "yes"}}
    b = {"name": "b", "path": "b.csv", "task": "off", "task_classes": {"neither": "no", "hate": "yes"}}
    assert parse_config(_raw(tmp_path, [a, b])).tasks == {"off": ["a", "b"]}
    assert parse_config(_raw(tmp_path, [{"name": "a", "path": "a.csv"}])).tasks == {}  # opt-in
    with pytest.raises(ConfigError, match="task 'off' has one dataset"):
        parse_config(_raw(tmp_path, [a]))
    with pytest.raises(ConfigError, match="different common classes"):
        parse_config(_raw(tmp_path, [a, b | {"task_classes": {"neither": "no", "hate": "rude"}}]))
    with pytest.raises(ConfigError, match="together"):
        parse_config(_raw(tmp_path, [a | {"task_classes": None}, b]))
    with pytest.raises(ConfigError, match="2 or more common classes"):
        parse_config(_raw(tmp_path, [a | {"task_classes": {"ok": "x", "toxic": "x"}}, b]))


def test_example_config_on_shared_data():
    path = Path(__file__).resolve().parents[2] / "examples" / "tasks_offensive_harmful.yaml"
    if not (SHARED_DATA / "refusal_harmful_harmless").exists():
        pytest.skip(f"{SHARED_DATA} is absent: the example's datasets live there")
    from mosaic_dag.data.datasets import load_dataset

    cfg = load_config(path)
    assert cfg.tasks == {"offensive": ["davidson", "demo_toxicity"], "harmful_request": ["jailbreak", "refusal"]}
    df = load_dataset(cfg.dataset("refusal"), "en", cfg.split, cfg.base_dir)
    assert set(df["label_name"]) == {"harmful", "harmless"}
    assert set(cfg.dataset("davidson").task_classes) == {"hate_speech", "offensive_language", "neither"}


def _csv(path: Path, good_name: str, bad_name: str, offset: int) -> Path:
    good = ["thank you my friend", "lovely day", "great post", "nice idea"]
    bad = ["you are a stupid idiot", "go away idiot", "i hate your post"]
    rows = []
    for i in range(30):
        rows.append({"text": f"{good[i % 4]} {WORDS[(i + offset) % 25]}", "label": good_name})
        rows.append({"text": f"{bad[i % 3]} {WORDS[(i + 7 + offset) % 25]}", "label": bad_name})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_task_transfer_in_the_graph(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    from mosaic_dag.evaluation.transfer import transfer_matrices
    from mosaic_dag.runner import run_experiment

    a, b = _csv(tmp_path / "a.csv", "ok", "toxic", 0), _csv(tmp_path / "b.csv", "neither", "offensive", 11)
    cfg_raw = {
        "name": "tiny-task", "data_dir": str(tmp_path / "data"),
        "models": [{"name": "tiny", "id": str(tiny_model_dir), "layers": [1], "max_length": 24, "batch_tokens": 256,
                    "saes": [TINY_SAE]}],
        "datasets": [
            {"name": "a", "path": str(a), "task": "off", "task_classes": {"ok": "no", "toxic": "yes"}},
            {"name": "b", "path": str(b), "task": "off", "task_classes": {"neither": "no", "offensive": "yes"}}],
        "classification": {"poolings": ["mean"], "thresholds": [None], "top_n": [4], "classifiers": ["logistic"],
                           "tfidf": ["word"], "bootstrap": 50},
        "mlflow": {"tracking_uri": mlflow_store(tmp_path)}, "sae_quality": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg_raw))
    summary = run_experiment(path, progress=False, echo=lambda *_: None)
    assert "task_transfer" in {s.asset for s in summary.steps}
    cfg = load_config(path)
    folder = cfg.data_path / "results" / "tiny.L1.btk"
    files = sorted(folder.glob("transfer-matrix.task-off.*.parquet"))
    matrices = transfer_matrices(cfg, files)
    assert sorted(matrices) == [f"tiny.L1.btk task-off {s}" for s in ("hidden", "sae", "tfidf")]
    for m in matrices.values():
        assert list(m.index) == ["a.en", "b.en"] and list(m.columns) == ["a.en", "b.en"]
    cells = pd.read_parquet(cfg.data_path / "tasks" / "tiny.L1.btk" / "off.parquet")
    assert len(cells) == 3 * 4 and set(cells["features"]) == {"sae", "hidden", "tfidf"}
    assert (cells["ci_low"] <= cells["macro_f1"]).all() and (cells["macro_f1"] <= cells["ci_high"]).all()
    # same words mean the same class in both datasets: TF-IDF transfers
    assert offdiag_mean(matrices["tiny.L1.btk task-off tfidf"]) > 0.8
    assert "task-off" in (cfg.data_path / "report" / "index.md").read_text()
