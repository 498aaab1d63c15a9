"""fused_blocks: faster forwards during extraction, each checked before use and removed afterwards."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mosaic_dag.config import ModelConfig
from mosaic_dag.lm.extract import (
    HiddenCache,
    extract_to_cache,
    forward_layers,
    make_batches,
    tokenize,
)
from mosaic_dag.lm.fused import fused_blocks
from mosaic_dag.lm.fused.attention import _causal_attention, _causal_rows_only, _fused_attention
from mosaic_dag.lm.fused.base import _onednn
from mosaic_dag.lm.fused.mlp import _fused_mlp
from mosaic_dag.lm.fused.norm import _inplace_rms_norm
from mosaic_dag.lm.models import decoder_layers, load_model

TEXTS = ["hello world", "you are a stupid idiot and i hate your post", "thank you my friend", "bonjour",
         "we love this great idea and the lovely day here with you"]


@pytest.fixture
def pair(tiny_model_dir: Path, tmp_path: Path):
    l16 = load_model(ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[2], dtype="bfloat16"), tmp_path)
    l32 = load_model(ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[2], dtype="float32"), tmp_path)
    return l16, l32


def _replaced(model: nn.Module) -> int:
    return sum("forward" in vars(m) for m in decoder_layers(model).modules())


def test_fused_blocks_replace_norms_linears_and_mlps_then_restore(pair):
    l16, _ = pair
    blocks = decoder_layers(l16.model)[:3]
    norms = sum(type(m).__name__ == "Gemma3RMSNorm" for b in blocks for m in b.modules())
    with fused_blocks(l16, 2, 64) as n:
        assert n.norms == norms > 0  # Gemma's (1 + w) RMSNorm, bit-identical in place
        if _onednn() is not None:
            assert n.mlps == 3 and n.linears == sum(type(m) is nn.Linear for b in blocks for m in b.modules())
            assert n.attentions == 3
        assert _replaced(l16.model) == n.total()
        assert "forward" not in vars(decoder_layers(l16.model)[3].mlp)  # blocks after the deepest untouched
    assert _replaced(l16.model) == 0
    with pytest.raises(RuntimeError, match="boom"), fused_blocks(l16, 2, 64):
        raise RuntimeError("boom")
    assert _replaced(l16.model) == 0  # restored on error too


def test_fused_extraction_is_no_less_accurate_than_the_stock_forward(pair, tmp_path: Path):
    """The cache written under fused_blocks vs the stock bf16 forward, both against float32."""
    l16, l32 = pair
    extract_to_cache(l16, TEXTS, [2], {2: tmp_path / "bf16"}, max_length=32, batch_tokens=24)
    extract_to_cache(l32, TEXTS, [2], {2: tmp_path / "fp32"}, max_length=32, batch_tokens=24)
    fast, ref = HiddenCache(tmp_path / "bf16").load_all(), HiddenCache(tmp_path / "fp32").load_all()
    ids, _ = tokenize(l16.tokenizer, TEXTS, 32)
    stock = np.zeros_like(fast.acts, dtype=np.float32)
    for batch in make_batches(ids, 24, l16.tokenizer.pad_token_id or 0):
        out = forward_layers(l16, [2], batch.input_ids, batch.attention_mask)[2]  # model's own forwards
        for b, row in enumerate(batch.rows):
            n_tok = int(batch.attention_mask[b].sum())
            stock[fast.offsets[row]:fast.offsets[row + 1]] = out[b, :n_tok].float().numpy()
    got, want = fast.acts.astype(np.float32), ref.acts.astype(np.float32)
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert (np.abs(got - stock) <= 3e-2 * scale).all()  # bf16 rounding apart, nothing more
    assert np.linalg.norm(got - want) <= 1.1 * np.linalg.norm(stock - want)


def test_float32_models_only_get_the_bit_identical_norms(pair):
    _, l32 = pair
    with fused_blocks(l32, 2, 64) as n:
        assert n.linears == 0 and n.mlps == 0 and n.norms > 0


class _SwappedMLP(nn.Module):
    """Looks like a gated MLP but computes down(gate(x) * act(up(x)))."""

    def __init__(self, d: int = 64, h: int = 128):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj, self.act_fn = nn.Linear(h, d, bias=False), nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class _GatedMLP(_SwappedMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_mlp_fusion_only_where_the_module_is_the_formula():
    ops = _onednn()
    if ops is None:
        pytest.skip("torch here has no oneDNN linear post-ops")
    torch.manual_seed(0)
    good, swapped = _GatedMLP().to(torch.bfloat16), _SwappedMLP().to(torch.bfloat16)
    swapped.load_state_dict(good.state_dict())
    fast = _fused_mlp(ops, good, 16)
    assert fast is not None and _fused_mlp(ops, swapped, 16) is None
    x = torch.randn(5, 7, 64).to(torch.bfloat16)
    with torch.inference_mode():
        assert fast(x).shape == (5, 7, 64)
        torch.testing.assert_close(fast(x).float(), good(x).float(), rtol=3e-2, atol=3e-2)


def test_only_gemma_style_rms_norms_are_replaced():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gemma, llama = Gemma3RMSNorm(32), LlamaRMSNorm(32)
    with torch.no_grad():
        gemma.weight.normal_(0, 0.3)
        llama.weight.normal_(1, 0.3)
    fast = _inplace_rms_norm(gemma)
    assert fast is not None and _inplace_rms_norm(llama) is None  # Llama: w * x.to(dtype), another rounding
    x = torch.randn(4, 32)
    before = x.clone()
    assert torch.equal(fast(x), gemma(x)) and torch.equal(x, before)  # float32 input is not normalised in place


def test_each_weight_is_packed_once_per_extraction(pair, monkeypatch: pytest.MonkeyPatch):
    """The fused MLP reuses the gate/up weights the packed linears already packed (no second copy)."""
    from mosaic_dag.lm.fused import linear
    l16, _ = pair
    if _onednn() is None:
        pytest.skip("torch here has no oneDNN packed linear")
    packed: list[int] = []
    real_call = linear._Packer.__call__

    def counting(self: linear._Packer, module: nn.Linear) -> torch.Tensor:
        if module not in self.done:
            packed.append(id(module))
        return real_call(self, module)

    monkeypatch.setattr(linear._Packer, "__call__", counting)
    with fused_blocks(l16, 2, 64) as n:
        assert n.mlps == 3 and len(packed) == len(set(packed)) == n.linears


def test_blocked_causal_attention_matches_masked_softmax():
    torch.manual_seed(0)
    n, tokens, group, d = 3, 45, 4, 16  # 45 tokens: a partial last block, for block sizes 8 and 32
    q, k, v = torch.randn(n, tokens * group, d), torch.randn(n, tokens, d), torch.randn(n, tokens, d)
    heads_first = q.view(n, tokens, group, d).transpose(1, 2)  # [n, group, T, D]
    scores = heads_first @ k[:, None].transpose(-1, -2)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    want = (torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v[:, None]).transpose(1, 2)
    for block in (8, 32, 64):
        got = _causal_attention(q, k, v, group, block=block).view(n, tokens, group, d)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_attention_takes_only_causal_right_padded_masks():
    tokens = 6
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    right = (causal & real[:, None, :])[:, None]
    assert _causal_rows_only(None, tokens) and _causal_rows_only(right, tokens)
    additive = torch.zeros(right.shape).masked_fill(~right, torch.finfo(torch.float32).min)
    assert _causal_rows_only(additive, tokens)  # eager attention's float mask, same pattern
    left = (causal & real.flip(1)[:, None, :])[:, None]
    assert not _causal_rows_only(left, tokens)  # left padding: real tokens sit at shifted positions
    window = right & ~torch.ones(tokens, tokens, dtype=torch.bool).tril(-3)
    assert not _causal_rows_only(window, tokens)  # a sliding window cuts keys off
    assert not _causal_rows_only(torch.ones(2, 1, tokens, tokens, dtype=torch.bool), tokens)  # bidirectional


def test_fused_attention_runs_where_it_applies_and_defers_elsewhere(pair, monkeypatch: pytest.MonkeyPatch):
    """Real tokens agree with the stock forward; a batch longer than the sliding window goes to it."""
    from mosaic_dag.lm.fused import attention
    l16, _ = pair
    blocks = decoder_layers(l16.model)
    full, sliding = blocks[1].self_attn, blocks[0].self_attn  # the tiny model: sliding window 8
    calls: list[int] = []
    blocked = attention._causal_attention
    monkeypatch.setattr(attention, "_causal_attention", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    torch.manual_seed(0)
    for tokens, module, used in ((12, full, True), (12, sliding, False), (8, sliding, True)):
        fast = _fused_attention(module)
        assert fast is not None
        x = torch.randn(2, tokens, 64).to(torch.bfloat16)
        real = torch.arange(tokens)[None, :] < torch.tensor([[tokens], [tokens - 3]])
        mask = (torch.ones(tokens, tokens, dtype=torch.bool).tril() & real[:, None, :])[:, None]
        emb = l16.model.model.rotary_emb(x, torch.arange(tokens)[None].expand(2, tokens), layer_type=module.layer_type)
        calls.clear()
        with torch.inference_mode():
            got = fast(x, emb, mask)[0]
            assert bool(calls) == used
            stock = module(x, emb, mask)[0]
            with pytest.raises(AttributeError, match="update"):  # a cache goes to the stock forward, which uses it
                fast(x, emb, mask, past_key_values=object())
        assert len(calls) == int(used)
        torch.testing.assert_close(got[real].float(), stock[real].float(), rtol=3e-2, atol=3e-2)


def test_attention_fusion_only_for_the_gemma_formula(pair):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    l16, _ = pair
    attention = decoder_layers(l16.model)[1].self_attn
    assert _fused_attention(attention) is not None
    attention.attn_logit_softcapping = 50.0  # Gemma 2's tanh capping: not what the fused forward computes
    assert _fused_attention(attention) is None
    attention.attn_logit_softcapping = None
    attention.k_norm = LlamaRMSNorm(32).to(torch.bfloat16)  # another norm formula
    assert _fused_attention(attention) is None


def test_fused_attention_with_several_key_value_heads():
    """Grouped-query attention with 2 key/value heads (4 query heads): the transposing path."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import (
        Gemma3Attention,
        Gemma3RotaryEmbedding,
    )

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, sliding_window=64,
                           layer_types=["full_attention", "full_attention"], attn_implementation="sdpa")
    torch.manual_seed(0)
    attention = Gemma3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        attention.q_norm.weight.normal_(0, 0.3)
        attention.k_norm.weight.normal_(0, 0.3)
    attention = attention.to(torch.bfloat16)
    fast = _fused_attention(attention)
    assert fast is not None
    tokens = 10
    x = torch.randn(3, tokens, 64).to(torch.bfloat16)
    real = torch.arange(tokens)[None, :] < torch.tensor([[10], [7], [1]])
    mask = (torch.ones(tokens, tokens, dtype=torch.bool).tril() & real[:, None, :])[:, None]
    emb = Gemma3RotaryEmbedding(cfg)(x, torch.arange(tokens)[None].expand(3, tokens), layer_type="full_attention")
    with torch.inference_mode():
        got, want = fast(x, emb, mask)[0], attention(x, emb, mask)[0]
    torch.testing.assert_close(got[real].float(), want[real].float(), rtol=3e-2, atol=3e-2)


def test_attention_binds_to_the_installed_signature_and_defers_by_keyword(pair):
    """The decoder layer calls attention by keyword (``cache=`` in transformers 5.x); a call the fused
    path does not handle (longer than the sliding window, a cache) reaches the stock forward as it came."""
    import inspect

    l16, _ = pair
    with fused_blocks(l16, 2, 64) as n:
        if n.attentions == 0:
            pytest.skip("no fused attention on this torch (no oneDNN)")
        sliding = decoder_layers(l16.model)[0].self_attn  # the tiny model's sliding window: 8 tokens
        params = inspect.signature(type(sliding).forward).parameters
        cache_keyword = next(k for k in ("cache", "past_key_values") if k in params)
        x = torch.randn(1, 12, 64).to(torch.bfloat16)
        emb = l16.model.model.rotary_emb(x, torch.arange(12)[None], layer_type=sliding.layer_type)
        call = {"hidden_states": x, "position_embeddings": emb, "attention_mask": None, cache_keyword: None}
        with torch.inference_mode():
            got = sliding(**call)[0]  # 12 > 8 tokens: deferred with every keyword intact
            want = type(sliding).forward(sliding, **call)[0]
        assert torch.equal(got, want)


def test_a_replacement_that_does_not_fit_the_installed_forward_is_not_installed(pair, monkeypatch, caplog):
    """A forward whose signature moved (as a transformers release may do) keeps the stock forward, logged once."""
    from transformers.models.gemma3 import modeling_gemma3

    from mosaic_dag.lm.fused import base
    l16, _ = pair
    stock = modeling_gemma3.Gemma3Attention.forward

    def moved(self, states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):  # renamed input
        return stock(self, states, position_embeddings, attention_mask, cache=cache, **kwargs)

    monkeypatch.setattr(modeling_gemma3.Gemma3Attention, "forward", moved)
    base._reported.clear()
    with caplog.at_level("WARNING", logger="mosaic_dag.lm.fused"):
        for _ in range(2):
            with fused_blocks(l16, 2, 64) as n:
                assert n.attentions == 0
    refusals = [r for r in caplog.records if "Gemma3Attention" in r.getMessage()]
    assert len(refusals) == 1 and "signature" in refusals[0].getMessage()


def test_blocks_that_disagree_with_the_stock_forward_get_no_replacement(pair, tmp_path: Path, monkeypatch, caplog):
    """The whole-block probe: a replacement that passed its own check but is wrong in the model removes every
    replacement, and extraction then writes exactly the stock forward's activations."""
    from mosaic_dag.lm.fused import attention, base
    l16, _ = pair
    extract_to_cache(l16, TEXTS, [2], {2: tmp_path / "before"}, max_length=32, batch_tokens=24)
    real_norm_rotate = attention._norm_rotate
    monkeypatch.setattr(attention, "_attention_passes", lambda *a, **k: True)
    monkeypatch.setattr(attention, "_norm_rotate", lambda *a: real_norm_rotate(*a) * 3.0)  # a wrong attention
    base._reported.clear()
    with caplog.at_level("WARNING", logger="mosaic_dag.lm.fused"), fused_blocks(l16, 2, 64) as n:
        assert n.total() == 0 and _replaced(l16.model) == 0
    if _onednn() is not None:
        assert any("probe batch differs" in r.getMessage() for r in caplog.records)
    extract_to_cache(l16, TEXTS, [2], {2: tmp_path / "after"}, max_length=32, batch_tokens=24)
    ids, _ = tokenize(l16.tokenizer, TEXTS, 32)
    got = HiddenCache(tmp_path / "after").load_all()
    for batch in make_batches(ids, 24, l16.tokenizer.pad_token_id or 0):
        out = forward_layers(l16, [2], batch.input_ids, batch.attention_mask)[2]
        for b, row in enumerate(batch.rows):
            n_tok = int(batch.attention_mask[b].sum())
            np.testing.assert_array_equal(got.acts[got.offsets[row]:got.offsets[row + 1]],
                                          out[b, :n_tok].float().numpy().astype(got.acts.dtype))


def test_single_input_replacements_take_their_input_by_name_too(pair):
    """Norms, linears and MLPs bound to the stock signature: a keyword call gives the same as a positional
    one, and an unexpected extra argument reaches the stock forward (which rejects it as it would)."""
    import inspect

    l16, _ = pair
    block = decoder_layers(l16.model)[0]
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    with fused_blocks(l16, 2, 64), torch.inference_mode():
        norm = block.input_layernorm
        assert "forward" in vars(norm)
        name = list(inspect.signature(type(norm).forward).parameters)[1]  # after self
        assert torch.equal(norm(x), norm(**{name: x}))
        with pytest.raises(TypeError):
            norm(x, "unexpected")


def test_fused_checks_hold_on_a_cpu_without_native_bf16():
    """The same fused-forward checks with oneDNN capped below AVX-512 BF16 (bf16 then runs emulated, as on
    a CPU without it): slower, never different in verdict. Skipped where this torch has no oneDNN."""
    import os
    import subprocess
    import sys

    if _onednn() is None:
        pytest.skip("torch here has no oneDNN: there is no native-bf16 path to cap")
    here = Path(__file__)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    tests = [f"{here}::{name}" for name in ("test_fused_extraction_is_no_less_accurate_than_the_stock_forward",
                                            "test_attention_binds_to_the_installed_signature_and_defers_by_keyword",
                                            "test_fused_blocks_replace_norms_linears_and_mlps_then_restore")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         env=env, capture_output=True, text=True, timeout=600, cwd=here.parents[2])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
