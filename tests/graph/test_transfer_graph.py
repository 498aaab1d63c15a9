"""Transfer, hard conditions, behaviour labels and the report through the Dagster graph (tiny model)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mosaic_dag.evaluation.conditions import conditions_table

from mosaic_dag.evaluation.transfer import transfer_matrices
from mosaic_dag.config import load_config
from mosaic_dag.evaluation.results import results_table
from mosaic_dag.data.step import read_dataset
from mosaic_dag.runner import run_experiment
from tests.support.models import TINY_SAE, SHARED_DATA, WORDS, mlflow_store

FAST = {"poolings": ["mean"], "thresholds": [None], "top_n": [4], "classifiers": ["logistic"],
        "tfidf": ["word"], "bootstrap": 50}


def two_language_csv(path: Path) -> Path:
    good = {"en": ["thank you my friend", "lovely day", "great post", "nice idea"],
            "fr": ["merci mon ami", "bonjour la une", "est tu es", "une les et"]}
    bad = {"en": ["you are a stupid idiot", "go away idiot", "i hate your post"],
           "fr": ["tu es un idiot", "va idiot la", "les idiot et"]}
    rows = []
    for lang in ("en", "fr"):
        for i in range(30):
            rows.append({"text": f"{good[lang][i % 4]} {WORDS[i % 25]}", "label": "ok", "lang": lang})
            rows.append({"text": f"{bad[lang][i % 3]} {WORDS[(i + 7) % 25]}", "label": "toxic", "lang": lang})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_config(tmp_path: Path, model_dir: Path, datasets: list[dict], **extra) -> Path:
    cfg = {
        "name": "tiny-transfer", "data_dir": str(tmp_path / "data"),
        "models": [{"name": "tiny", "id": str(model_dir), "layers": [1], "max_length": 24, "batch_tokens": 256,
                    "saes": [TINY_SAE]}],
        "datasets": datasets, "classification": FAST,
        "mlflow": {"tracking_uri": mlflow_store(tmp_path)},
        "sae_quality": {"enabled": False}, **extra,  # tiny random model: no healthy SAE
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_transfer_conditions_behaviour_and_report(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    csv = two_language_csv(tmp_path / "tox.csv")
    config = write_config(tmp_path, tiny_model_dir, [
        {"name": "tox", "path": str(csv), "language": None, "language_field": "lang", "languages": ["en", "fr"]},
        {"name": "beh", "path": str(csv), "language": None, "language_field": "lang", "languages": ["en"],
         "behaviour": {"model": "tiny", "task": "choice", "prompt_template": "is this toxic {text} answer",
                       "options": [" yes", " no"], "answer_field": "label", "answer_map": {"toxic": 0, "ok": 1},
                       "chat": False}},
    ], conditions={"enabled": True, "sizes": [8, None], "imbalances": [0.5], "noise_rates": [0.0, 0.3]})
    summary = run_experiment(config, progress=False, echo=lambda *_: None)
    cfg = load_config(config)
    assert {"transfer", "conditions", "report"} <= {s.asset for s in summary.steps}

    table = results_table(cfg)
    cross = table[table["train_language"] != table["test_language"]]
    assert set(cross["features"]) == {"sae", "hidden", "tfidf"}
    assert set(zip(cross["train_language"], cross["test_language"])) == {("en", "fr"), ("fr", "en")}
    matrices = transfer_matrices(cfg)
    assert sorted(matrices) == [f"tiny.L1.btk tox {s}" for s in ("hidden", "sae", "tfidf")]
    for m in matrices.values():
        assert m.shape == (2, 2) and list(m.columns) == ["en", "fr"]
    # the diagonal of the matrix is the in-language probe of the results table (same held-out rows)
    diag = table[(table["dataset"] == "tox") & (table["features"] == "sae") & (table["train_language"] == "en")
                 & (table["test_language"] == "en")]
    assert np.isclose(matrices["tiny.L1.btk tox sae"].loc["en", "en"], diag["macro_f1"].iloc[0])

    beh = read_dataset(cfg, "beh", "en").frame
    assert set(beh["label_name"]) <= {"correct", "wrong"} and beh["label_name"].nunique() == 2
    assert set(table[table["dataset"] == "beh"]["features"]) == {"sae", "hidden", "tfidf"}

    curves = conditions_table(cfg)
    assert set(curves["features"]) == {"sae", "hidden", "tfidf"}
    assert set(curves["condition"]) == {"size", "imbalance", "noise"}
    assert curves.groupby(["features", "dataset", "language"])["n_test"].nunique().eq(1).all()

    index = cfg.data_path / "report" / "index.md"
    text = index.read_text()
    pngs = sorted((cfg.data_path / "report").glob("*.png"))
    assert len(pngs) >= 4 and all(p.name in text for p in pngs)
    assert summary.report == index.with_name("index.html") and summary.report.exists()


@pytest.mark.integration
def test_eight_language_sentiment_matrices(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    folder = SHARED_DATA / "tweet_sentiment_multilingual"
    if not folder.exists():
        pytest.skip(f"shared data not found at {folder} (only present on project machines)")
    names = {"ar": "arabic", "en": "english", "fr": "french", "de": "german", "hi": "hindi", "it": "italian",
             "pt": "portuguese", "es": "spanish"}
    config = write_config(tmp_path, tiny_model_dir, [
        {"name": "sentiment", "language": None, "max_rows": 90, "label_names": {0: "negative", 1: "neutral", 2: "positive"},
         "paths": {c: str(folder / n) for c, n in names.items()}},
    ])
    run_experiment(config, progress=False, echo=lambda *_: None)
    cfg = load_config(config)
    matrices = transfer_matrices(cfg)
    assert len(matrices) == 3
    for m in matrices.values():
        assert m.shape == (8, 8) and not m.isna().any().any()
    cross = results_table(cfg).query("train_language != test_language")
    assert len(cross) == 3 * 8 * 7
