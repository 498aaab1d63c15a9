"""mosaic_dag.sae.registry: reading sae-lens's registry from disk and picking SAEs for our models/layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mosaic_dag.sae.registry import (
    matching_saes,
    model_key,
    models_match,
    neuronpedia_id,
    parse_layer,
    parse_site,
    read_registry,
    registry_cursor,
)

FAKE_REGISTRY = {
    "gemma-scope-2-270m-pt-res": {
        "conversion_func": "gemma_3",
        "model": "google/gemma-3-270m",
        "repo_id": "google/gemma-scope-2-270m-pt",
        "saes": [
            {"id": "layer_6_width_16k_l0_medium", "path": "resid_post/layer_6_width_16k_l0_medium", "l0": 60,
             "neuronpedia": "gemma-3-270m/6-gemmascope-2-res-16k"},
            {"id": "layer_6_width_65k_l0_small", "path": "resid_post/layer_6_width_65k_l0_small", "l0": 20},
            {"id": "layer_9_width_16k_l0_medium", "path": "resid_post/layer_9_width_16k_l0_medium", "l0": 60},
        ],
    },
    "gemma-scope-2-270m-pt-mlp": {  # same model and layer, but MLP output: not our residual stream
        "model": "google/gemma-3-270m",
        "repo_id": "google/gemma-scope-2-270m-pt",
        "saes": [{"id": "layer_6_width_16k_l0_medium", "path": "mlp_out/layer_6_width_16k_l0_medium"}],
    },
    "gemma-scope-2-270m-pt-transcoders": {
        "model": "google/gemma-3-270m",
        "repo_id": "google/gemma-scope-2-270m-pt",
        "saes": [{"id": "transcoder/layer_6_width_16k_l0_big", "path": "transcoder/layer_6_width_16k_l0_big"}],
    },
    "gemma-scope-2-270m-it-res": {  # instruction-tuned model: a different model
        "model": "google/gemma-3-270m-it",
        "repo_id": "google/gemma-scope-2-270m-it",
        "saes": [{"id": "layer_6_width_16k_l0_medium", "path": "resid_post/layer_6_width_16k_l0_medium"}],
    },
    "gemma-scope-2b-pt-res-canonical": {
        "model": "gemma-2-2b",
        "repo_id": "google/gemma-scope-2b-pt-res",
        "saes": [{"id": "layer_12/width_16k/canonical", "path": "layer_12/width_16k/average_l0_82"}],
    },
    "gpt2-small-res-jb": {  # resid_pre of block 7 is the output of block 6
        "model": "gpt2-small",
        "repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
        "saes": [
            {"id": "blocks.7.hook_resid_pre", "path": "blocks.7.hook_resid_pre"},
            {"id": "blocks.0.hook_resid_pre", "path": "blocks.0.hook_resid_pre"},
        ],
    },
}


def _write(path: Path, registry: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


def test_matching_saes_picks_only_configured_model_and_layers(tmp_path: Path) -> None:
    reg = read_registry(_write(tmp_path / "reg.yaml", FAKE_REGISTRY))
    entries = matching_saes(reg, ["bundled:gemma-3-270m"], {"bundled:gemma-3-270m": [6]})
    assert [(e.release, e.sae_id) for e in entries] == [
        ("gemma-scope-2-270m-pt-res", "layer_6_width_16k_l0_medium"),
        ("gemma-scope-2-270m-pt-res", "layer_6_width_65k_l0_small"),
    ]
    first = entries[0]
    assert (first.layer, first.site, first.model, first.configured_model) == (6, "resid_post", "google/gemma-3-270m", "bundled:gemma-3-270m")
    assert first.neuronpedia_id == "gemma-3-270m/6-gemmascope-2-res-16k" and entries[1].neuronpedia_id is None
    assert first.path == "resid_post/layer_6_width_16k_l0_medium" and first.repo_id == "google/gemma-scope-2-270m-pt"

    both = matching_saes(reg, ["gemma-3-270m", "gemma-2-2b"], {"gemma-3-270m": [9], "gemma-2-2b": [12, 3]})
    assert [(e.release, e.layer) for e in both] == [("gemma-scope-2b-pt-res-canonical", 12), ("gemma-scope-2-270m-pt-res", 9)]
    assert matching_saes(reg, ["google/gemma-3-270m"], {"google/gemma-3-270m": [0, 1]}) == []


def test_matching_saes_shifts_resid_pre_to_our_layer(tmp_path: Path) -> None:
    reg = read_registry(_write(tmp_path / "reg.yaml", FAKE_REGISTRY))
    entries = matching_saes(reg, ["gpt2-small"], {"gpt2-small": [6, 7, 0]})
    assert [(e.sae_id, e.layer, e.site) for e in entries] == [("blocks.7.hook_resid_pre", 6, "resid_pre")]


def test_cursor_changes_only_when_matching_saes_change(tmp_path: Path) -> None:
    path = _write(tmp_path / "reg.yaml", FAKE_REGISTRY)
    models, layers = ["google/gemma-3-270m"], {"google/gemma-3-270m": [6, 9]}
    c1 = registry_cursor(matching_saes(read_registry(path), models, layers))
    assert c1 == registry_cursor(matching_saes(read_registry(path), models, layers))
    assert c1 == registry_cursor(list(reversed(matching_saes(read_registry(path), models, layers))))

    grown = yaml.safe_load(yaml.safe_dump(FAKE_REGISTRY))
    grown["gpt2-small-res-jb"]["saes"].append({"id": "blocks.9.hook_resid_pre", "path": "blocks.9.hook_resid_pre"})
    _write(path, grown)  # new SAE for a model we do not use: nothing to do
    c2 = registry_cursor(matching_saes(read_registry(path), models, layers))
    assert c2 == c1

    grown["gemma-scope-2-270m-pt-res"]["saes"].append({"id": "layer_6_width_262k_l0_big", "path": "resid_post/layer_6_width_262k_l0_big"})
    _write(path, grown)
    entries = matching_saes(read_registry(path), models, layers)
    assert ("gemma-scope-2-270m-pt-res", "layer_6_width_262k_l0_big") in {(e.release, e.sae_id) for e in entries}
    assert registry_cursor(entries) != c1


def test_read_registry_rereads_the_file_every_call(tmp_path: Path) -> None:
    path = _write(tmp_path / "reg.yaml", {"a": {"model": "m", "repo_id": "r", "saes": []}})
    assert set(read_registry(path)) == {"a"}
    _write(path, {"a": {"model": "m", "repo_id": "r", "saes": []}, "b": {"model": "m", "repo_id": "r", "saes": []}})
    assert set(read_registry(path)) == {"a", "b"}
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="not a mapping"):
        read_registry(path)


def test_neuronpedia_id_lookup(tmp_path: Path) -> None:
    reg = read_registry(_write(tmp_path / "reg.yaml", FAKE_REGISTRY))
    assert neuronpedia_id("gemma-scope-2-270m-pt-res", "layer_6_width_16k_l0_medium", reg) == "gemma-3-270m/6-gemmascope-2-res-16k"
    assert neuronpedia_id("gemma-scope-2-270m-pt-res", "layer_9_width_16k_l0_medium", reg) is None
    assert neuronpedia_id("nope", "x", reg) is None


def test_packaged_registry_has_gemma_scope_2_for_gemma_3_270m() -> None:
    reg = read_registry()  # the YAML inside the installed sae-lens
    entries = matching_saes(reg, ["google/gemma-3-270m"], {"google/gemma-3-270m": [5]})
    ids = {(e.release, e.sae_id): e for e in entries}
    medium = ids[("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium")]
    assert medium.neuronpedia_id == "gemma-3-270m/5-gemmascope-2-res-16k"
    assert all(e.layer == 5 and e.site == "resid_post" for e in entries)
    assert not any("mlp" in e.release or "transcoder" in e.release or "-it-" in e.release for e in entries)
    assert neuronpedia_id("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium") == medium.neuronpedia_id


def test_registry_module_does_not_import_torch_or_sae_lens() -> None:
    """The sensor ticks often; reading the registry must stay a cheap file read."""
    code = (
        "import sys; from mosaic_dag.sae.registry import read_registry; read_registry(); "
        "bad = [m for m in ('torch', 'sae_lens') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)


@pytest.mark.parametrize(
    ("text", "layer"),
    [
        ("blocks.6.hook_resid_post", 6),
        ("model.layers.6", 6),
        ("model.layers.12.output", 12),
        ("layer_6", 6),
        ("resid_post/layer_6_width_16k_l0_medium", 6),
        ("layer_12/width_16k/canonical", 12),
        ("resid_post_layer_3_trainer_1", 3),
        ("l12r_8x", 12),
        ("width_16k", None),
        (None, None),
    ],
)
def test_parse_layer(text: str | None, layer: int | None) -> None:
    assert parse_layer(text) == layer


def test_parse_site_and_model_names() -> None:
    assert parse_site("gemma-scope-2-270m-pt-res", "layer_6_width_16k_l0_medium", "resid_post/layer_6_width_16k_l0_medium") == "resid_post"
    assert parse_site("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical") == "resid_post"
    assert parse_site("gemma-scope-2b-pt-mlp", "layer_0/width_16k/average_l0_119") == "mlp_out"
    assert parse_site("gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_104") == "attn_out"
    assert parse_site("x", "transcoder/layer_6_width_16k_l0_big") == "transcoder"
    assert parse_site("gpt2-small-res-jb", "blocks.7.hook_resid_pre") == "resid_pre"
    assert parse_site("qwen-scope", "layer0") is None
    assert model_key("google/gemma-3-270m") == model_key("bundled:gemma-3-270m") == "gemma-3-270m"
    assert models_match("google/gemma-3-1b-pt", "gemma-3-1b")
    assert not models_match("google/gemma-3-270m", "google/gemma-3-270m-it")
    assert not models_match(None, "gemma-3-270m") and not models_match("", "")
