from pathlib import Path

import pytest

from mosaic_dag.config import load_config, parse_config
from mosaic_dag.errors import ConfigError
from mosaic_dag.partitions import dataset_keys, parse_dataset, parse_target, targets

BASE = {"models": [{"name": "m", "layers": [6]}], "datasets": [{"name": "d", "path": "x.csv"}]}


def test_embedded_demo_config_is_valid():
    cfg = load_config(None)
    assert cfg.models[0].id == "bundled:gemma-3-270m"
    assert [d.key for d in dataset_keys(cfg)] == [f"demo_toxicity.{x}" for x in ("en", "fr", "de", "es")] + [
        "demo_behaviour.en"]
    assert cfg.dataset("demo_behaviour").behaviour.model == "gemma-3-270m"
    assert [t.key for t in targets(cfg)] == ["gemma-3-270m.L6.local-btk512"]


def _err(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_the_path():
    msg = _err({**BASE, "models": [{"name": "m", "layers": [6], "layer": 3}]})
    assert "models.0.layer" in msg and "unknown key" in msg


def test_wrong_type_and_literal():
    assert "models.0.layers.0" in _err({**BASE, "models": [{"name": "m", "layers": ["six"]}]})
    msg = _err({**BASE, "classification": {"poolings": ["median"]}})
    assert "classification.poolings.0" in msg and "'sum'" in msg


def test_source_rules():
    assert "hf_name" in _err({**BASE, "datasets": [{"name": "d"}]})
    assert "release" in _err({**BASE, "models": [{"name": "m", "layers": [1], "saes": [{"source": "registry"}]}]})
    assert "languages" in _err({**BASE, "datasets": [{"name": "d", "path": "x", "language_field": "lang"}]})
    assert "partition key" in _err({**BASE, "models": [{"name": "m.1", "layers": [1]}]})
    assert "unique" in _err({**BASE, "datasets": [{"name": "d", "path": "a"}, {"name": "d", "path": "b"}]})


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - name: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("data_dir: out\nmodels: [{name: m, layers: [1]}]\ndatasets: [{name: d, path: x.csv}]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data_path == tmp_path / "out"


def test_per_language_paths_define_the_languages():
    cfg = parse_config({**BASE, "datasets": [{"name": "s", "language": None, "paths": {"en": "e", "fr": "f"}}]})
    assert cfg.dataset_languages("s") == ["en", "fr"]
    assert "one of 'path', 'paths'" in _err({**BASE, "datasets": [{"name": "s", "path": "x", "paths": {"en": "e"}}]})


def test_behaviour_rules():
    msg = _err({**BASE, "datasets": [{"name": "d", "path": "x", "behaviour": {"model": "m", "task": "choice"}}]})
    assert "datasets.0.behaviour" in msg and "options" in msg


def test_partition_keys_round_trip():
    t = parse_target("gemma-3-270m.L12.gs-16k")
    assert (t.model, t.layer, t.sae) == ("gemma-3-270m", 12, "gs-16k") and t.key == "gemma-3-270m.L12.gs-16k"
    d = parse_dataset("sentiment.pt")
    assert (d.dataset, d.language) == ("sentiment", "pt")
    with pytest.raises(ConfigError):
        parse_target("gemma.6.sae")
