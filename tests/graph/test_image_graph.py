"""`mosaic run` on bundled:digits with a tiny random Gemma 3 vision-language model: image partitions
go through the same graph (SAE codes, pooling, probes, transfer, report), and the class descriptions
give a text -> image transfer row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mosaic_dag.evaluation.conditions import conditions_table

from mosaic_dag.evaluation.transfer import transfer_matrices
from mosaic_dag.cli import main
from mosaic_dag.config import load_config
from mosaic_dag.evaluation.results import results_table
from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.data.step import dataset_handle, read_dataset
from mosaic_dag.lm.hidden_states import build_hidden_states, hidden_cache
from tests.support.models import mlflow_store
from tests.support.vlm import build_tiny_vlm

SAE = {"origin": "train", "name": "btk", "architecture": "batchtopk", "width": 64, "k": 4, "training_tokens": 4000,
       "batch_size": 32}
TEMPLATES = ["a handwritten digit {label_name}", "the digit {label_name}", "the number {label_name}",
             "a picture of the number {label_name}", "a drawing of a {label_name}", "an image of a {label_name}"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm-graph"))


def test_mosaic_run_on_digits_with_a_tiny_vlm(tmp_path: Path, vlm_dir: Path, dagster_home: Path,
                                              capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump({
        "name": "digits-vlm", "data_dir": str(tmp_path / "data"),
        "models": [{"name": "vlm", "id": str(vlm_dir), "layers": [1], "dtype": "float32", "max_length": 32,
                    "batch_tokens": 320, "saes": [SAE]}],
        "datasets": [{"name": "digits", "path": "bundled:digits", "max_rows": 200,
                      "prompt_template": "{image} a handwritten digit",
                      "descriptions": {"language": "en", "templates": TEMPLATES}}],
        "classification": {"poolings": ["mean", "max"], "thresholds": [None], "top_n": [4], "classifiers": ["logistic"],
                           "tfidf": ["word"], "bootstrap": 50},
        "conditions": {"enabled": True, "sizes": [20, None], "imbalances": [0.5], "noise_rates": [0.0, 0.2]},
        "mlflow": {"tracking_uri": mlflow_store(tmp_path)},
        "sae_quality": {"enabled": False},  # tiny random model: no healthy SAE
    }))
    assert main(["run", "--config", str(config), "--quiet"]) == 0, capsys.readouterr().err
    cfg = load_config(config)
    table = results_table(cfg)

    inside = table[table["train_language"] == table["test_language"]]
    image = inside[inside["language"] == "image"]
    assert set(image["features"]) == {"sae", "hidden"}  # TF-IDF has no words in an image
    assert set(image["pooling"]) == {"mean", "max"}
    assert (image["n_test"] == (read_dataset(cfg, "digits", "image").frame["split"] == "test").sum()).all()
    assert set(inside[inside["language"] == "en"]["features"]) == {"sae", "hidden", "tfidf"}

    cross = table[table["train_language"] != table["test_language"]]
    assert set(zip(cross["train_language"], cross["test_language"])) == {("en", "image"), ("image", "en")}
    assert set(cross["features"]) == {"sae", "hidden"}
    text_to_image = cross[(cross["train_language"] == "en") & (cross["features"] == "sae")]
    assert len(text_to_image) == 1 and 0.0 <= text_to_image["macro_f1"].iloc[0] <= 1.0
    assert text_to_image["macro_f1_ci_low"].iloc[0] <= text_to_image["macro_f1_ci_high"].iloc[0]

    matrices = transfer_matrices(cfg)
    assert sorted(matrices) == ["vlm.L1.btk digits hidden", "vlm.L1.btk digits sae"]
    for m in matrices.values():
        assert list(m.index) == ["image", "en"] and list(m.columns) == ["image", "en"]

    done, cache = _hidden(cfg, "vlm", 1, "digits", "image", verify=True)
    assert done.cache_hit  # the graph's cache, found again from the config alone
    shard = HiddenCache(cache.path).load_all()
    man = cache.manifest()
    assert man["modality"] == "image" and man["token_selection"] == "image"
    np.testing.assert_array_equal(shard.real_mask, shard.token_ids == man["image_token_id"])
    assert int(shard.real_mask.sum()) == 4 * man["texts"]  # 4 soft tokens per image, nothing else counted

    curves = conditions_table(cfg)
    assert set(curves.loc[curves["language"] == "image", "features"]) == {"sae", "hidden"}
    assert set(curves.loc[curves["language"] == "en", "features"]) == {"sae", "hidden", "tfidf"}
    assert set(curves["condition"]) == {"size", "imbalance", "noise"}

    report = (cfg.data_path / "report" / "index.md").read_text()
    assert "TF-IDF has no words to read in an image" in report


def _hidden(cfg, model: str, layer: int, dataset: str, language: str, verify: bool = False):  # type: ignore[no-untyped-def]
    """The hidden_states step for one dataset partition, and what it did for ``model`` / its ``layer`` cache."""
    data = dataset_handle(read_dataset(cfg, dataset, language), f"{dataset}.{language}")
    result = build_hidden_states(cfg, data, verify=verify)
    done = next(m for m in result.models if m.model == model)
    return done, hidden_cache(result.handle, model, layer)


def test_paligemma_partition_through_the_library_steps(tmp_path: Path):
    """Without Dagster: dataset -> hidden states of a tiny PaliGemma, its 16 image tokens per image counted."""
    from mosaic_dag.config import parse_config
    from mosaic_dag.data.step import build_dataset
    from tests.support.vlm import build_tiny_paligemma

    folder = build_tiny_paligemma(tmp_path / "pali")
    cfg = parse_config({
        "data_dir": str(tmp_path / "data"),
        "models": [{"name": "pali", "id": str(folder), "layers": [0, 2], "dtype": "float32", "max_length": 24}],
        "datasets": [{"name": "digits", "path": "bundled:digits", "max_rows": 60, "prompt_template": "{image}caption en",
                      "tokens": "all", "descriptions": {"templates": TEMPLATES}}],
    })
    for language in cfg.dataset_languages("digits"):
        build_dataset(cfg, "digits", language)
    images, cache = _hidden(cfg, "pali", 2, "digits", "image")
    assert not images.cache_hit and images.layers_computed == [0, 2]  # one forward pass for both layers
    shard = HiddenCache(cache.path).load_all()
    per_row = np.add.reduceat(shard.image_mask.astype(int), shard.offsets[:-1])
    assert (per_row == 16).all() and len(per_row) == 60
    words = np.add.reduceat((shard.real_mask & ~shard.image_mask).astype(int), shard.offsets[:-1])
    assert (words == 2).all()  # tokens: all = 16 image tokens + "caption en"; BOS never
    assert _hidden(cfg, "pali", 0, "digits", "image")[0].cache_hit
    _, texts = _hidden(cfg, "pali", 2, "digits", "en")
    assert HiddenCache(texts.path).load_all().image_mask is None  # text rows: the text path
