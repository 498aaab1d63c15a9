"""Parity: the cached activation is exactly resid_post of block L, for layers 0, mid and last."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_dag.config import ModelConfig
from mosaic_dag.errors import ModelError
from mosaic_dag.lm.extract import HiddenCache, extract_to_cache, forward_layers, make_batches, tokenize
from mosaic_dag.lm.models import decoder_layers, default_batch_tokens, fingerprint, load_model, resolve_dtype

TEXTS = [
    "hello world",
    "you are a stupid idiot and i hate your post",
    "thank you my friend",
    "bonjour",
    "we love this great idea and the lovely day here with you",
]


@pytest.fixture
def tiny(tiny_model_dir: Path, tmp_path: Path):
    return load_model(ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[0], dtype="float32"), tmp_path)


def hook_reference(loaded, text: str, layer: int) -> np.ndarray:
    """Output of model.model.layers[L] from a full, unbatched forward (LM head included)."""
    got = {}
    block = decoder_layers(loaded.model)[layer]
    h = block.register_forward_hook(lambda m, i, o: got.setdefault("x", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.inference_mode():
            loaded.model(**loaded.tokenizer([text], return_tensors="pt"))
    finally:
        h.remove()
    return got["x"][0].float().numpy()


def test_cached_activation_equals_block_output(tiny, tmp_path: Path):
    layers = [0, 2, 3]  # first, middle, last of 4 blocks
    targets = {layer: tmp_path / f"L{layer}" for layer in layers}
    stats = extract_to_cache(tiny, TEXTS, layers, targets, max_length=32, batch_tokens=24)
    assert stats.forward_calls > 1  # several batches, so padding really happened
    for layer in layers:
        cache = HiddenCache(targets[layer]).load_all()
        for i, text in enumerate(TEXTS):
            ref = hook_reference(tiny, text, layer)
            got = cache.acts[cache.offsets[i]:cache.offsets[i + 1]].astype(np.float32)
            assert got.shape == ref.shape  # no padding rows stored
            np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
            if layer < 3:  # HF convention: hidden_states[L + 1] (not hidden_states[L])
                with torch.inference_mode():
                    hs = tiny.model(**tiny.tokenizer([text], return_tensors="pt"), output_hidden_states=True).hidden_states
                np.testing.assert_allclose(got, hs[layer + 1][0].numpy(), rtol=2e-3, atol=2e-3 * np.abs(ref).max())
                assert not np.allclose(got, hs[layer][0].numpy(), atol=1e-3)


def test_bfloat16_cache_is_the_same_hook_point_within_bf16_rounding(tiny_model_dir: Path, tmp_path: Path):
    """bf16 (the default where the CPU multiplies it natively): still resid_post of block L, and close to fp32."""
    l16 = load_model(ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[2], dtype="bfloat16"), tmp_path)
    l32 = load_model(ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[2], dtype="float32"), tmp_path)
    assert l16.dtype == torch.bfloat16 and l32.dtype == torch.float32 and l16.fingerprint != l32.fingerprint
    for loaded, name in ((l16, "bf16"), (l32, "fp32")):
        extract_to_cache(loaded, TEXTS, [2], {2: tmp_path / name}, max_length=32, batch_tokens=24)
    c16, c32 = HiddenCache(tmp_path / "bf16").load_all(), HiddenCache(tmp_path / "fp32").load_all()
    np.testing.assert_array_equal(c16.offsets, c32.offsets)
    for i, text in enumerate(TEXTS):
        got = c16.acts[c16.offsets[i]:c16.offsets[i + 1]].astype(np.float32)
        ref16 = hook_reference(l16, text, 2)
        scale = np.abs(ref16).max(axis=1, keepdims=True)
        assert (np.abs(got - ref16) <= 2e-2 * scale).all()  # batched+padded vs alone: bf16 rounding only
        with torch.inference_mode():
            hs = l16.model(**l16.tokenizer([text], return_tensors="pt"), output_hidden_states=True).hidden_states
        assert np.abs(got - hs[3][0].float().numpy()).max() < np.abs(got - hs[2][0].float().numpy()).max()
        ref32 = c32.acts[c32.offsets[i]:c32.offsets[i + 1]].astype(np.float32)
        rel = np.abs(got - ref32).max(axis=1) / np.abs(ref32).max(axis=1)
        assert np.median(rel) < 2e-2, f"bf16 vs fp32 relative difference {np.median(rel):.3g}"


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path):
    from mosaic_dag.lm import models
    assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    cfg = ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[0], device="cpu")
    assert cfg.dtype == "auto" and fingerprint(cfg).endswith("#bfloat16")
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    # the cache key follows the dtype actually used: an fp32 cache is never read as a bf16 one
    assert fingerprint(cfg).endswith("#float32") and fingerprint(cfg) == fingerprint(cfg.model_copy(update={"dtype": "float32"}))
    # unset batch_tokens: the budget make bench found best on CPU, a bigger one on GPU
    assert cfg.batch_tokens is None
    assert default_batch_tokens(torch.device("cpu")) == 2048 and default_batch_tokens(torch.device("cuda")) == 8192


def test_padding_and_bos_are_masked(tiny, tmp_path: Path):
    extract_to_cache(tiny, TEXTS, [1], {1: tmp_path / "L1"}, max_length=32, batch_tokens=1000)
    cache = HiddenCache(tmp_path / "L1").load_all()
    ids, _ = tokenize(tiny.tokenizer, TEXTS, 32)
    assert cache.offsets[-1] == sum(len(x) for x in ids)
    assert not np.isin(cache.token_ids, [tiny.tokenizer.pad_token_id]).any()
    bos = cache.token_ids == tiny.tokenizer.bos_token_id
    assert bos.sum() == len(TEXTS) and not cache.real_mask[bos].any() and cache.real_mask[~bos].all()


def test_forward_stops_after_the_deepest_layer(tiny):
    calls: list[str] = []
    blocks = decoder_layers(tiny.model)
    handles = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(f"block{n}")) for n, b in enumerate(blocks)]
    handles.append(tiny.model.lm_head.register_forward_hook(lambda m, i, o: calls.append("lm_head")))
    try:
        batch = next(make_batches(tokenize(tiny.tokenizer, TEXTS, 16)[0], 1000, 0))
        out = forward_layers(tiny, [0, 1], batch.input_ids, batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    assert set(out) == {0, 1}
    assert calls == ["block0", "block1"]


def test_batches_are_length_sorted_under_the_token_budget():
    ids = [[1] * n for n in (3, 9, 5, 9, 2, 7)]
    batches = list(make_batches(ids, 18, 0))
    assert all(b.input_ids.numel() <= 18 or len(b.rows) == 1 for b in batches)
    lengths = [len(ids[r]) for b in batches for r in b.rows]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(r for b in batches for r in b.rows) == list(range(6))


def test_batches_close_early_rather_than_pad_much():
    ids = [[1] * n for n in (10, 10, 10, 10, 5, 5, 5, 5)]
    capped = list(make_batches(ids, 80, 0))  # budget fits all 8, but the 5s would be padded by half
    assert [sorted(len(ids[r]) for r in b.rows) for b in capped] == [[10] * 4, [5] * 4]
    assert sum(b.input_ids.numel() for b in capped) == sum(map(len, ids))  # no padding at all
    assert len(list(make_batches(ids, 80, 0, max_padding=1.0))) == 1  # cap off: one padded batch
    # a bigger budget: 4 texts (40 tokens) are under its quarter (50), so a 5 joins before the batch may close
    assert [len(b.rows) for b in make_batches(ids, 200, 0)] == [5, 3]


def test_layer_out_of_range_fails_before_any_forward(tiny, tmp_path: Path):
    with pytest.raises(ModelError, match=r"layers \[7\] out of range .* 4 blocks; use 0\.\.3"):
        extract_to_cache(tiny, TEXTS, [7], {7: tmp_path / "L7"}, max_length=8, batch_tokens=64)
    assert not (tmp_path / "L7").exists()


def test_failed_write_leaves_no_partial_folder(tiny, tmp_path: Path):
    def boom(done: int, total: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        extract_to_cache(tiny, TEXTS, [0], {0: tmp_path / "c" / "L0"}, max_length=16, batch_tokens=24, progress=boom)
    assert list((tmp_path / "c").iterdir()) == []


def test_corrupt_shard_is_detected(tiny, tmp_path: Path):
    extract_to_cache(tiny, TEXTS, [0], {0: tmp_path / "L0"}, max_length=16, batch_tokens=1000)
    cache = HiddenCache(tmp_path / "L0")
    assert cache.is_valid()
    shard = next((tmp_path / "L0").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache.is_valid(deep=False) and not cache.is_valid(deep=True)


def test_capped_onednn_isa_means_no_native_bf16(monkeypatch: pytest.MonkeyPatch):
    from mosaic_dag.lm import models
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    models.cpu_has_bf16.cache_clear()
    try:
        assert models.cpu_has_bf16() is False  # bf16 is emulated below AVX512_CORE_BF16: auto takes float32
        assert resolve_dtype("auto", "cpu") == torch.float32
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        models.cpu_has_bf16.cache_clear()
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "") \
            if Path("/proc/cpuinfo").exists() else ""
        assert models.cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
    finally:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        models.cpu_has_bf16.cache_clear()
