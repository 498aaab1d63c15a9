from pathlib import Path

import pytest

from mosaic_dag.config import load_config, parse_config
from mosaic_dag.errors import ConfigError
from mosaic_dag.keys import dataset_keys, parse_dataset, parse_target, targets

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
    assert "release" in _err({**BASE, "models": [{"name": "m", "layers": [1], "saes": [{"origin": "registry"}]}]})
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


CLS = "classification"


@pytest.mark.parametrize("patch, fragment", [
    ({CLS: {"thresholds": [float("nan")]}}, "classification.thresholds.0: Input should be a finite number"),
    ({CLS: {"thresholds": [float("inf")]}}, "classification.thresholds.0: Input should be a finite number"),
    ({CLS: {"thresholds": [-1.0]}}, "classification.thresholds.0: Input should be greater than or equal to 0"),
    ({CLS: {"k": [0]}}, "classification.k.0: Input should be greater than or equal to 1"),
    ({CLS: {"top_n": [0]}}, "classification.top_n.0: Input should be greater than or equal to 1"),
    ({CLS: {"poolings": []}}, "classification.poolings: List should have at least 1 item"),
    ({CLS: {"classifiers": []}}, "classification.classifiers: List should have at least 1 item"),
    ({CLS: {"thresholds": []}}, "classification.thresholds: List should have at least 1 item"),
    ({CLS: {"k": [], "classifiers": ["ksparse"]}}, "classifier 'ksparse' needs at least one k"),
    ({CLS: {"bootstrap": True}}, "classification.bootstrap: Input should be a valid integer"),
    ({"models": [{"name": "m", "layers": [True]}]}, "models.0.layers.0: Input should be a valid integer"),
    ({"models": [{"name": "m", "layers": [1.0]}]}, "models.0.layers.0: Input should be a valid integer"),
    ({"models": [{"name": "m", "layers": [1], "saes": []}]}, "models.0.saes: List should have at least 1 item"),
    ({"models": [{"name": "m", "layers": [1], "trust_remote_code": "yes"}]}, "models.0.trust_remote_code: Input should be a valid boolean"),
    ({"models": [{"name": "m", "layers": [1], "saes": [{"width": 64}]}], CLS: {"k": [5, 100]}},
     "classification.k: [100] larger than the width 64 of SAE"),
    ({"split": {"validation": 0.45, "test": 0.45}}, "leave 10% of the rows for train, less than validation's 45%"),
    ({"transfer": {"threshold": float("nan")}}, "transfer.threshold: Input should be a finite number"),
    ({"conditions": {"noise_rates": [1.5]}}, "conditions.noise_rates.0: Input should be less than 1"),
])
def test_values_that_would_crash_or_lie_later_fail_validation(patch: dict, fragment: str):
    assert fragment in _err({**BASE, **patch})


def test_yaml_nan_and_booleans_are_refused_in_the_file(tmp_path: Path):
    """What the user writes: `.nan` and `yes` are YAML floats/booleans, not 'no threshold' / '1'."""
    base = "models: [{name: m, layers: [1]}]\ndatasets: [{name: d, path: x.csv}]\n"
    (tmp_path / "a.yaml").write_text(base + "classification: {thresholds: [.nan]}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: classification.thresholds.0: Input should be a finite number"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(base + "classification: {bootstrap: yes}\n")
    with pytest.raises(ConfigError, match=r"classification.bootstrap: Input should be a valid integer"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text(base + "classification: {thresholds: [null, 0, 1.5]}\n")  # ints for floats are fine
    assert load_config(tmp_path / "c.yaml").classification.thresholds == [None, 0.0, 1.5]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_old_sae_key_source_fails_with_the_rename(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from mosaic_dag.cli import main

    (tmp_path / "c.yaml").write_text("models:\n  - name: m\n    layers: [1]\n    saes:\n      - name: ok\n"
                                     "      - source: train\n        name: old\n"
                                     "datasets: [{name: d, path: x.csv}]\n")
    assert main([command, "--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("mosaic: error: ") and "models.0.saes.1" in err[0]
    assert "'source' is now 'origin' (registry|local|train)" in err[0]
    assert not (tmp_path / "mosaic_data").exists()
