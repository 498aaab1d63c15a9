"""Gemma-style attention in float32 blocks, the query heads folded onto their shared key/value head."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mosaic_dag.lm.fused.base import _probe, _refuse, _signature
from mosaic_dag.lm.fused.norm import _gemma_norm_parts

# Keywords that mean "attend over a cache": any of them set sends the call to the stock forward.
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Extra keywords the fused attention may ignore (rotary is already in ``position_embeddings``).
_HARMLESS_KEYWORDS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions"})

_ATTENTION_BLOCK = 32  # query tokens per score block: keys past the block's last token are never computed


def _norm_rotate(x: torch.Tensor, scale: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RMSNorm (x / rms(x) * scale) then the rotate-half rotary embedding, all in float32 ([B, T, heads, D])."""
    f = x.to(torch.float32, copy=True)
    f.mul_(torch.rsqrt(f.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(scale)
    half = f.shape[-1] // 2
    out = f * cos
    out[..., :half].addcmul_(f[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(f[..., :half], sin[..., half:])
    return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                      block: int = _ATTENTION_BLOCK) -> torch.Tensor:
    """softmax(q kᵀ) v with a causal mask, in float32; rows of ``q`` are (token, head) pairs.

    q [n, T * group, D] (the ``group`` query heads of one key/value head, token-major), k and v
    [n, T, D]. Query tokens go ``block`` at a time against the keys up to the block's last token,
    so about half the masked scores are never computed.
    """
    n, rows = q.shape[:2]
    tokens = k.shape[1]
    out = torch.empty(n, rows, v.shape[2], dtype=torch.float32)
    for t0 in range(0, tokens, block):
        t1 = min(tokens, t0 + block)
        scores = torch.bmm(q[:, t0 * group:t1 * group], k[:, :t1].transpose(1, 2))  # [n, (t1 - t0) * group, t1]
        later = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool).triu_(1).unsqueeze(1)  # key after the query token
        scores.view(n, t1 - t0, group, t1)[..., t0:].masked_fill_(later, float("-inf"))
        torch.bmm(torch.softmax(scores, dim=-1), v[:, :t1], out=out[:, t0 * group:t1 * group])
    return out


def _causal_rows_only(mask: torch.Tensor | None, tokens: int) -> bool:
    """True if ``mask`` (the model's [B, 1, T, T] mask, or None) lets every real token see exactly the
    tokens up to itself: causal, padding only on the right. Then plain causal attention gives the
    same outputs on real tokens (padded positions differ, and nothing reads them)."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (tokens, tokens):
        return False
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    real = allowed[:, -1]  # the last row sees every real key when padding is on the right
    if not bool((real[:, :-1] >= real[:, 1:]).all()):  # real keys form a prefix
        return False
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril_()
    return torch.equal(allowed, causal & real[:, None, :])


def _fused_attention(module: nn.Module, ops: Any = None, rows_hint: int = 1) -> Callable[..., Any] | None:
    """Gemma-style attention (q/k RMSNorms, rotate-half rotary, grouped key/value heads) in float32 blocks.

    Used for a forward without cache, extra outputs or a sliding window shorter than the batch, and
    with a causal right-padded mask; any other call goes to the stock forward. Kept only if the stock
    forward matches a float64 evaluation of that formula on a probe and this one is at least as close.
    With oneDNN (``ops``), q, k and v come from one product on their packed, stacked weights when
    that is bit-identical to three.
    """
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    linears = [getattr(module, name, None) for name in names]
    if not all(type(m) is nn.Linear for m in linears):
        return None
    norms = [_gemma_norm_parts(getattr(module, name, None)) for name in ("q_norm", "k_norm")]  # type: ignore[arg-type]
    head_dim, scaling = getattr(module, "head_dim", None), getattr(module, "scaling", None)
    if None in norms or not isinstance(head_dim, int) or not isinstance(scaling, float) or head_dim % 2:
        return None
    if getattr(module, "attn_logit_softcapping", None) is not None or not getattr(module, "is_causal", False):
        return None
    q_proj, k_proj, v_proj, o_proj = linears
    heads, kv_heads = q_proj.out_features // head_dim, k_proj.out_features // head_dim
    if heads * head_dim != q_proj.out_features or kv_heads < 1 or heads % kv_heads or v_proj.out_features != k_proj.out_features:
        return None
    stock = module.forward
    sig = _signature(stock)
    params = sig.parameters if sig is not None else {}
    if sig is None or not {"hidden_states", "position_embeddings", "attention_mask"} <= set(params):
        _refuse(type(module).__name__, f"unexpected forward signature {sig}")
        return None
    extra = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    (q_scale, q_eps), (k_scale, k_eps) = norms  # type: ignore[misc]
    group = heads // kv_heads
    window = getattr(module, "sliding_window", None)
    project = _stacked_projection(ops, q_proj, k_proj, v_proj, rows_hint)

    def inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any] | None:
        """(hidden_states, position_embeddings, mask) of a call the fused path computes exactly, else None."""
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError:
            return None
        rest = dict(bound.pop(extra, {}) if extra else {})
        rest.update({k: v for k, v in bound.items() if k not in ("hidden_states", "position_embeddings", "attention_mask")})
        hidden_states, embeddings, mask = bound["hidden_states"], bound.get("position_embeddings"), bound.get("attention_mask")
        if any(rest.get(name) is not None for name in _CACHE_KEYWORDS) or rest.get("output_attentions"):
            return None
        if any(v is not None and k not in _HARMLESS_KEYWORDS for k, v in rest.items()):
            return None
        if module.training or embeddings is None or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            return None
        tokens = hidden_states.shape[1]
        if (window is not None and tokens > window) or not _causal_rows_only(mask, tokens):
            return None
        return hidden_states, embeddings, mask

    def fast(*args: Any, **kwargs: Any) -> Any:
        taken = inputs(args, kwargs)
        if taken is None:
            return stock(*args, **kwargs)
        hidden_states, position_embeddings, _ = taken
        batch, tokens = hidden_states.shape[:2]
        cos, sin = (t.to(torch.float32).unsqueeze(2) for t in position_embeddings)  # [B, T, 1, D]
        q, k, v = project(hidden_states)
        q = _norm_rotate(q.view(batch, tokens, heads, head_dim), q_scale, q_eps, cos, sin)
        k = _norm_rotate(k.view(batch, tokens, kv_heads, head_dim), k_scale, k_eps, cos, sin)
        v = v.reshape(batch, tokens, kv_heads, head_dim).to(torch.float32)
        q.mul_(scaling)
        if kv_heads == 1:  # token-major rows: no transposes on the way in or out
            out = _causal_attention(q.view(batch, tokens * group, head_dim), k.view(batch, tokens, head_dim),
                                    v.view(batch, tokens, head_dim), group)
        else:
            q = q.view(batch, tokens, kv_heads, group, head_dim).transpose(1, 2).reshape(-1, tokens * group, head_dim)
            k, v = (t.transpose(1, 2).reshape(-1, tokens, head_dim) for t in (k, v))
            out = _causal_attention(q, k, v, group).view(batch, kv_heads, tokens, group, head_dim).transpose(1, 2)
        return o_proj(out.reshape(batch, tokens, heads * head_dim).to(hidden_states.dtype)), None

    cache_keyword = next((name for name in _CACHE_KEYWORDS if name in params), None)
    return fast if _attention_passes(module, fast, heads, kv_heads, head_dim, cache_keyword) else None


def _stacked_projection(ops: Any, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                        rows_hint: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """x -> (q, k, v): one oneDNN product on the stacked packed weights if bit-identical, else three."""

    def separate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return q_proj(x), k_proj(x), v_proj(x)

    parts = (q_proj, k_proj, v_proj)
    if ops is None or any(p.bias is not None for p in parts):
        return separate
    cuts = [q_proj.out_features, q_proj.out_features + k_proj.out_features]
    try:
        packed = ops._reorder_linear_weight(torch.cat([p.weight for p in parts]), max(1, rows_hint))
    except RuntimeError:
        return separate

    def stacked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = ops._linear_pointwise(x, packed, None, "none", [], "")
        return qkv[..., :cuts[0]], qkv[..., cuts[0]:cuts[1]], qkv[..., cuts[1]:]

    probe = _probe((5, q_proj.in_features), q_proj.weight.dtype)
    with torch.inference_mode():
        same = all(torch.equal(a, b) for a, b in zip(stacked(probe), separate(probe)))
    return stacked if same else separate


def _attention_passes(module: nn.Module, fast: Callable[..., Any], heads: int, kv_heads: int, head_dim: int,
                      cache_keyword: str | None) -> bool:
    """Stock and fused attention on the installed transformers, called the way a decoder layer calls them.

    On a right-padded probe batch both must match a float64 evaluation (real tokens only), the fused
    one at least as closely; calls it must not handle (left padding, longer than the sliding window)
    must give exactly the stock result. Any exception means: not installed.
    """
    what = type(module).__name__
    dtype = module.q_proj.weight.dtype  # type: ignore[union-attr]
    window = getattr(module, "sliding_window", None)

    def probe(batch: int, tokens: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        lengths = torch.tensor([tokens] + [max(1, tokens - 4)] * (batch - 1))
        pos = torch.arange(tokens)[None, :]
        real = pos >= (tokens - lengths[:, None]) if left else pos < lengths[:, None]
        mask = (torch.ones(tokens, tokens, dtype=torch.bool).tril() & real[:, None, :])[:, None]
        x = _probe((batch, tokens, module.q_proj.in_features), dtype, scale=2.0)  # type: ignore[union-attr]
        angle = torch.arange(tokens, dtype=torch.float64)[None, :, None] / (1.0 + torch.arange(head_dim // 2))
        angle = torch.cat([angle, angle], dim=-1).expand(batch, tokens, head_dim)
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        call = {"hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": mask, "position_ids": pos}
        if cache_keyword is not None:
            call[cache_keyword] = None
        return real, mask, call

    try:
        with torch.inference_mode():
            real, mask, call = probe(2, min(12, int(window)) if window is not None else 12)
            x, (cos, sin) = call["hidden_states"], call["position_embeddings"]
            ref = _attention_reference(module, x, cos, sin, mask, heads, kv_heads, head_dim)[real]
            norm = float(ref.norm()) or 1.0
            stock_err = float((module(**call)[0].double()[real] - ref).norm()) / norm
            fast_err = float((fast(**call)[0].double()[real] - ref).norm()) / norm
            positional = fast(x, (cos, sin), mask)[0]
            if not torch.equal(positional, fast(**call)[0]):
                _refuse(what, "positional and keyword calls differ")
                return False
            deferred = [probe(2, 12, left=True)[2]]
            if window is not None and window < 4096:
                deferred.append(probe(1, int(window) + 1)[2])
            for other in deferred:
                if not torch.allclose(fast(**other)[0], module(**other)[0], rtol=0, atol=0, equal_nan=True):
                    _refuse(what, "a call handed to the stock forward came back different")
                    return False
    except Exception as exc:  # noqa: BLE001 - any failure on this transformers means: keep the stock forward
        _refuse(what, f"probe call failed ({type(exc).__name__}: {exc})")
        return False
    if stock_err > 0.05:
        _refuse(what, f"the stock forward is not the Gemma attention formula (error {stock_err:.3g})")
        return False
    if fast_err > stock_err * 1.05 + 1e-6:
        _refuse(what, f"fused error {fast_err:.3g} above the stock forward's {stock_err:.3g}")
        return False
    return True


def _attention_reference(module: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                         heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The Gemma attention formula in float64: o(softmax(rot(norm(q)) rot(norm(k))ᵀ · scaling + mask) v)."""
    f = nn.functional

    def linear(m: Any, h: torch.Tensor) -> torch.Tensor:
        return f.linear(h, m.weight.double(), None if m.bias is None else m.bias.double())

    def norm_rot(h: torch.Tensor, norm: Any) -> torch.Tensor:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.double())
        c, s = cos.double().unsqueeze(2), sin.double().unsqueeze(2)
        half = head_dim // 2
        return h * c + torch.cat([-h[..., half:], h[..., :half]], dim=-1) * s

    batch, tokens = x.shape[:2]
    xd = x.double()
    q = norm_rot(linear(module.q_proj, xd).view(batch, tokens, heads, head_dim), module.q_norm).transpose(1, 2)
    k = norm_rot(linear(module.k_proj, xd).view(batch, tokens, kv_heads, head_dim), module.k_norm).transpose(1, 2)
    v = linear(module.v_proj, xd).view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * float(module.scaling)  # type: ignore[arg-type]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return linear(module.o_proj, out)
