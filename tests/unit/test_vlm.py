"""Vision-language extraction on tiny random Gemma 3 multimodal and PaliGemma models built from configs.

The image-token mask must match the processor's image-token ids, the cached activation at every
position must equal a forward hook on the language model's block L in the model's own full forward,
and tokens outside the selection must never reach a pooling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_dag.config import ModelConfig
from mosaic_dag.errors import ModelError
from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.data.images import _digits, decode_png, to_png
from mosaic_dag.lm.models import decoder_layers, load_model
from mosaic_dag.features.pooling import pool_dense
from mosaic_dag.lm.vlm import extract_images_to_cache, processor_inputs, prompt_text
from tests.support.vlm import build_tiny_paligemma, build_tiny_vlm

PROMPTS = {"gemma3": "{image} a handwritten digit", "paligemma": "{image}caption en"}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"gemma3": build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm")),
            "paligemma": build_tiny_paligemma(tmp_path_factory.mktemp("tiny-pali"))}


def _load(folder: Path, tmp_path: Path):
    return load_model(ModelConfig(name="vlm", id=str(folder), layers=[0], dtype="float32", max_length=64),
                      tmp_path / "models")


def _pngs(n: int) -> list[bytes]:
    return [to_png(img, f"row {i}") for i, img in enumerate(_digits()["image"][:n])]


def _extract(loaded, pngs, layers, tmp_path: Path, tokens: str, prompt: str, batch_tokens: int = 48):
    targets = {layer: tmp_path / tokens / f"L{layer}" for layer in layers}
    stats = extract_images_to_cache(loaded, pngs, layers, targets, prompt_template=prompt, tokens=tokens,
                                    max_length=64, batch_tokens=batch_tokens)
    return stats, {layer: HiddenCache(path).load_all() for layer, path in targets.items()}


@pytest.mark.parametrize("kind", ["gemma3", "paligemma"])
def test_image_mask_matches_processor_image_token_ids(kind: str, vlm_dirs, tmp_path: Path):
    loaded = _load(vlm_dirs[kind], tmp_path)
    proc = loaded.processor
    proc_image_ids = set(getattr(proc, "image_token_ids", None) or [proc.image_token_id])
    if kind == "gemma3":
        proc_image_ids = {proc.tokenizer.image_token_id}
    _, caches = _extract(loaded, _pngs(5), [1], tmp_path, "image", PROMPTS[kind])
    shard = caches[1]
    assert shard.image_mask is not None
    np.testing.assert_array_equal(shard.image_mask, np.isin(shard.token_ids, sorted(proc_image_ids)))
    per_row = np.add.reduceat(shard.image_mask.astype(int), shard.offsets[:-1])
    assert per_row.tolist() == [proc.image_seq_length] * 5  # every image's soft tokens, nothing else
    np.testing.assert_array_equal(shard.real_mask, shard.image_mask)  # tokens: image


@pytest.mark.parametrize("kind", ["gemma3", "paligemma"])
def test_cached_activation_equals_hook_on_language_model_block(kind: str, vlm_dirs, tmp_path: Path):
    loaded = _load(vlm_dirs[kind], tmp_path)
    layers = [0, 1, loaded.n_layers - 1]  # first, middle and last block
    pngs = _pngs(3)
    _, caches = _extract(loaded, pngs, layers, tmp_path, "all", PROMPTS[kind])
    blocks = decoder_layers(loaded.model)
    assert blocks is loaded.model.model.language_model.layers
    for row, png in enumerate(pngs):
        inputs = processor_inputs(loaded, [decode_png(png)], prompt_text(loaded, PROMPTS[kind]))
        seen: dict[int, torch.Tensor] = {}
        hooks = [blocks[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)[0]))
            for layer in layers]
        try:
            with torch.inference_mode():
                loaded.model(**inputs)  # the model's own full forward, LM head included
        finally:
            for h in hooks:
                h.remove()
        for layer in layers:
            shard = caches[layer]
            a, b = shard.offsets[row], shard.offsets[row + 1]
            np.testing.assert_array_equal(shard.token_ids[a:b], inputs["input_ids"][0].numpy())
            image = shard.image_mask[a:b]
            assert image.sum() == loaded.processor.image_seq_length
            expected = seen[layer].float().numpy()
            np.testing.assert_allclose(shard.acts[a:b][image].astype(np.float32), expected[image], rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(shard.acts[a:b].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_forward_stops_after_deepest_requested_block(vlm_dirs, tmp_path: Path):
    loaded = _load(vlm_dirs["gemma3"], tmp_path)
    ran: list[str] = []
    blocks = decoder_layers(loaded.model)
    handles = [blocks[i].register_forward_hook(lambda *_a, i=i: ran.append(f"block{i}")) for i in range(len(blocks))]
    handles.append(loaded.model.lm_head.register_forward_hook(lambda *_a: ran.append("lm_head")))
    try:
        stats, _ = _extract(loaded, _pngs(4), [1], tmp_path, "image", PROMPTS["gemma3"], batch_tokens=1000)
    finally:
        for h in handles:
            h.remove()
    assert stats.forward_calls == 1
    assert ran == ["block0", "block1"]


def test_token_selection_and_masked_positions_never_reach_pooling(vlm_dirs, tmp_path: Path):
    loaded = _load(vlm_dirs["gemma3"], tmp_path)
    pngs = _pngs(4)
    selected = {tokens: _extract(loaded, pngs, [2], tmp_path, tokens, PROMPTS["gemma3"])[1][2]
                for tokens in ("image", "text", "all")}
    image, text, both = selected["image"], selected["text"], selected["all"]
    np.testing.assert_array_equal(image.acts, both.acts)  # one forward; only the selection differs
    bos, boi, eoi = (loaded.tokenizer.bos_token_id, loaded.model.config.boi_token_id, loaded.model.config.eoi_token_id)
    never = np.isin(both.token_ids, [bos, boi, eoi])
    assert never.any() and not (both.real_mask & never).any()
    np.testing.assert_array_equal(text.real_mask, ~image.image_mask & ~never)  # the prompt's words only
    np.testing.assert_array_equal(both.real_mask, image.real_mask | text.real_mask)
    words = [loaded.tokenizer.convert_ids_to_tokens(int(t)) for t in both.token_ids[text.real_mask]]
    assert set(words) == {"a", "handwritten", "digit"}
    for tokens, shard in selected.items():
        poisoned = shard.acts.astype(np.float32).copy()
        poisoned[~shard.real_mask] = 1e4  # anything outside the selection that leaked would show
        for pooling in ("sum", "mean", "max", "last"):
            got = pool_dense(poisoned, shard.offsets, shard.real_mask, pooling)
            clean_pool = pool_dense(shard.acts.astype(np.float32), shard.offsets, shard.real_mask, pooling)
            np.testing.assert_allclose(got, clean_pool, rtol=1e-6, err_msg=f"{tokens}/{pooling}")
        mean = pool_dense(shard.acts.astype(np.float32), shard.offsets, shard.real_mask, "mean")
        a, b = shard.offsets[0], shard.offsets[1]
        manual = shard.acts[a:b][shard.real_mask[a:b]].astype(np.float32).mean(axis=0)
        np.testing.assert_allclose(mean[0], manual, rtol=1e-5, atol=1e-6)


def test_image_rows_longer_than_max_length_fail_with_one_line(vlm_dirs, tmp_path: Path):
    loaded = _load(vlm_dirs["gemma3"], tmp_path)
    with pytest.raises(ModelError, match=r"takes 10 tokens but max_length is 6.*raise models\[vlm\].max_length") as err:
        extract_images_to_cache(loaded, _pngs(2), [0], {0: tmp_path / "c"}, prompt_template=PROMPTS["gemma3"],
                                tokens="image", max_length=6, batch_tokens=64)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()  # no partial artifact


def test_text_model_cannot_read_images(tiny_model_dir: Path, tmp_path: Path):
    loaded = load_model(ModelConfig(name="txt", id=str(tiny_model_dir), layers=[0], dtype="float32"), tmp_path)
    assert loaded.processor is None
    with pytest.raises(ModelError, match="reads no images"):
        extract_images_to_cache(loaded, _pngs(1), [0], {0: tmp_path / "c"}, prompt_template="{image}",
                                tokens="image", max_length=64, batch_tokens=64)
    assert not (tmp_path / "c").exists()


def test_paligemma_language_model_is_what_its_saes_must_match():
    from mosaic_dag.sae.registry import models_match
    from mosaic_dag.lm.vlm import sae_model_name

    assert models_match(sae_model_name("google/paligemma2-3b-pt-224"), "gemma-2-2b")
    assert sae_model_name("google/paligemma2-10b-pt-448") == "google/gemma-2-9b"
    assert sae_model_name("google/gemma-3-4b-pt") == "google/gemma-3-4b-pt"  # Gemma 3 SAEs name the VLM itself
    assert sae_model_name("someone/paligemma2-3bx") == "someone/paligemma2-3bx"


@pytest.mark.integration
def test_real_gemma3_tokenizer_image_tokens_mask_and_parity(tmp_path: Path):
    """The bundled model's tokenizer is Gemma 3's: the processor's output tokenizes into the real ids."""
    from mosaic_dag.lm.models import bundled_snapshot
    from mosaic_dag.paths import models_dir

    folder = build_tiny_vlm(tmp_path / "vlm-real-tok", tokenizer_from=bundled_snapshot(models_dir()))
    loaded = _load(folder, tmp_path)
    tok = loaded.tokenizer
    assert tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"]) == [255999, 256000, 262144]
    assert loaded.model.config.image_token_id == tok.image_token_id == 262144
    layers = [0, 3]
    pngs = _pngs(2)
    _, caches = _extract(loaded, pngs, layers, tmp_path, "text", PROMPTS["gemma3"])
    shard = caches[3]
    np.testing.assert_array_equal(shard.image_mask, shard.token_ids == 262144)
    assert np.add.reduceat(shard.image_mask.astype(int), shard.offsets[:-1]).tolist() == [4, 4]
    counted = {tok.convert_ids_to_tokens(int(t)) for t in shard.token_ids[shard.real_mask]}
    assert not counted & {"<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"}
    assert {"▁handwritten", "▁digit"} <= counted
    inputs = processor_inputs(loaded, [decode_png(pngs[1])], prompt_text(loaded, PROMPTS["gemma3"]))
    seen: dict[str, torch.Tensor] = {}

    def keep(_m, _i, out) -> None:  # a hook that returns something would replace the block's output
        seen["x"] = (out[0] if isinstance(out, tuple) else out)[0]

    h = decoder_layers(loaded.model)[3].register_forward_hook(keep)
    try:
        with torch.inference_mode():
            loaded.model(**inputs)
    finally:
        h.remove()
    a, b = shard.offsets[1], shard.offsets[2]
    np.testing.assert_array_equal(shard.token_ids[a:b], inputs["input_ids"][0].numpy())
    np.testing.assert_allclose(shard.acts[a:b].astype(np.float32), seen["x"].float().numpy(), rtol=2e-3, atol=2e-3)


def test_prompt_and_token_selection_are_part_of_the_cache_key():
    import pandas as pd

    from mosaic_dag.config import parse_config
    from mosaic_dag.lm.vlm import partition_hash

    def dcfg(**fields):
        cfg = parse_config({"models": [{"name": "m", "layers": [0]}],
                            "datasets": [{"name": "d", "path": "bundled:digits", **fields}]})
        return cfg.dataset("d")

    images = pd.DataFrame({"text": ["image:ab"], "image": [b"png"]})
    keys = {partition_hash(dcfg(**f), images, "rows") for f in
            ({}, {"tokens": "all"}, {"tokens": "text"}, {"prompt_template": "{image} a digit"})}
    assert len(keys) == 4 and "rows" not in keys
    assert partition_hash(dcfg(), images, "rows") == partition_hash(dcfg(tokens="image"), images, "rows")
    assert partition_hash(dcfg(), pd.DataFrame({"text": ["a digit"]}), "rows") == "rows"  # text rows: as before
