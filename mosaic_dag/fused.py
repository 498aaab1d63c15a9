"""Faster forwards for the blocks extraction runs, each checked against the model's own before use.

Extraction pushes every text through the same few blocks. On CPU in bfloat16 four things there cost
more than the arithmetic needs: oneDNN re-packs each linear weight on every call, a gated MLP runs
its activation and its product as two extra passes over a [tokens, intermediate] tensor, each
RMSNorm allocates a fresh float32 tensor per step, and attention copies its one key/value head per
query head and runs a kernel tuned for long sequences on short ones. ``fused_blocks`` swaps in
forwards that pack once, fold the activation and the product into the oneDNN products, normalise
in place, and attend in float32 blocks with the query heads folded onto their shared key/value head.

Every replacement is tried on a fixed probe input first and kept only if it passes:
- linears and RMSNorms must give bit-identical outputs;
- a fused MLP cannot be bit-identical (its activation sees the float32 accumulator instead of a
  bfloat16-rounded one), so it must be at least as close as the stock forward to a float32
  evaluation of the same MLP;
- fused attention keeps float32 from the q/k norms to the output (the stock forward rounds to
  bfloat16 after the norms and at each step of the rotation), so it too must be at least as close
  as the stock forward to a float64 evaluation, on a right-padded probe batch.
Anything that fails, or any module of another shape, keeps its own forward. The model's forwards
come back on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mosaic_dag.models import LoadedModel, decoder_layers

# oneDNN post-ops tried on an MLP's activation, as (name, algorithm) of ``mkldnn._linear_pointwise``.
_POST_OPS: tuple[tuple[str, str], ...] = (("gelu", "tanh"), ("gelu", "none"), ("swish", ""), ("relu", ""))


@dataclass
class Fused:
    """How many modules of each kind run a replacement forward."""

    linears: int = 0
    mlps: int = 0
    norms: int = 0
    attentions: int = 0

    @property
    def total(self) -> int:
        return self.linears + self.mlps + self.norms + self.attentions


def _probe(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _onednn() -> Any:
    ops = getattr(torch.ops, "mkldnn", None)
    ok = (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
          and hasattr(ops, "_reorder_linear_weight"))
    return ops if ok else None


class _Packer:
    """oneDNN-packed weights, one per linear: the packed linear and the fused MLP share them."""

    def __init__(self, ops: Any, rows_hint: int):
        self.ops, self.rows_hint = ops, max(1, rows_hint)
        self.done: dict[nn.Module, torch.Tensor] = {}

    def __call__(self, module: nn.Linear) -> torch.Tensor:  # RuntimeError where oneDNN cannot pack it
        if module not in self.done:
            self.done[module] = self.ops._reorder_linear_weight(module.weight, self.rows_hint)
        return self.done[module]


def _packed_forward(ops: Any, module: nn.Linear, rows_hint: int,
                    pack: _Packer | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``F.linear`` on a weight packed once, if bit-identical on a probe."""
    try:
        packed = (pack or _Packer(ops, rows_hint))(module)
    except RuntimeError:
        return None
    bias = module.bias

    def fast(x: torch.Tensor) -> torch.Tensor:
        return ops._linear_pointwise(x, packed, bias, "none", [], "")

    probe = _probe((3, module.in_features), module.weight.dtype)
    with torch.inference_mode():
        same = torch.equal(fast(probe), nn.functional.linear(probe, module.weight, module.bias))
    return fast if same else None


def _mlp_parts(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Module] | None:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if not all(type(p) is nn.Linear for p in parts[:3]) or not isinstance(parts[3], nn.Module):
        return None
    return parts[0], parts[1], parts[2], parts[3]  # type: ignore[return-value]


def _fused_mlp(ops: Any, module: nn.Module, rows_hint: int,
               pack: _Packer | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """down(act(gate(x)) * up(x)) as three oneDNN products: act fused into gate, the product into up.

    Kept only if the stock forward matches a float32 evaluation of that formula (so the module
    really is a gated MLP) and the fused one is at least as close to it.
    """
    parts = _mlp_parts(module)
    if parts is None:
        return None
    gate, up, down, act = parts
    if gate.bias is not None or up.bias is not None:
        return None
    pack = pack or _Packer(ops, rows_hint)
    try:
        packed_gate, packed_up = pack(gate), pack(up)
    except RuntimeError:
        return None
    f = nn.functional
    x = _probe((16, gate.in_features), gate.weight.dtype)
    with torch.inference_mode():
        x32 = x.float()
        ref = f.linear(act(f.linear(x32, gate.weight.float())) * f.linear(x32, up.weight.float()), down.weight.float(),
                       None if down.bias is None else down.bias.float())
        norm = float(ref.norm()) or 1.0
        stock_err = float((module(x).float() - ref).norm()) / norm
        if stock_err > 0.05:  # not down(act(gate(x)) * up(x)): leave it alone
            return None
        for name, algorithm in _POST_OPS:

            def fast(h: torch.Tensor, name: str = name, algorithm: str = algorithm) -> torch.Tensor:
                flat = h.reshape(-1, h.shape[-1])
                g = ops._linear_pointwise(flat, packed_gate, None, name, [], algorithm)
                z = ops._linear_pointwise.binary(flat, g, packed_up, None, "mul")
                return down(z.view(*h.shape[:-1], z.shape[-1]))

            try:
                err = float((fast(x).float() - ref).norm()) / norm
            except RuntimeError:
                continue
            if err <= stock_err * 1.05 + 1e-6:
                return fast
    return None


def _inplace_rms_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Gemma's RMSNorm, (x / rms(x)) * (1 + w) in float32, on one float32 buffer; if bit-identical."""
    weight, eps = getattr(module, "weight", None), getattr(module, "eps", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    if not isinstance(eps, float):
        return None
    scale = 1.0 + weight.detach().float()

    def fast(x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32, copy=True)
        inv = torch.rsqrt(out.pow(2).mean(-1, keepdim=True).add_(eps))
        return out.mul_(inv).mul_(scale).to(x.dtype)

    with torch.inference_mode():
        for dtype in (weight.dtype, torch.float32):
            probe = _probe((2, 3, weight.shape[0]), dtype, scale=4.0)
            if not torch.equal(fast(probe), module(probe)):
                return None
    return fast


_ATTENTION_BLOCK = 32  # query tokens per score block: keys past the block's last token are never computed


def _gemma_norm_parts(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(1 + w in float32, eps) of a Gemma-style RMSNorm (checked bit for bit by ``_inplace_rms_norm``)."""
    if _inplace_rms_norm(module) is None:
        return None
    return 1.0 + module.weight.detach().float(), float(module.eps)  # type: ignore[union-attr, arg-type]


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
    (q_scale, q_eps), (k_scale, k_eps) = norms  # type: ignore[misc]
    group = heads // kv_heads
    window = getattr(module, "sliding_window", None)
    stock = module.forward
    project = _stacked_projection(ops, q_proj, k_proj, v_proj, rows_hint)

    def fast(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: torch.Tensor | None = None,
             past_key_values: Any = None, **kwargs: Any) -> Any:
        batch, tokens = hidden_states.shape[:2]
        if (past_key_values is not None or module.training or position_embeddings is None or kwargs.get("output_attentions")
                or (window is not None and tokens > window) or not _causal_rows_only(attention_mask, tokens)):
            return stock(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
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

    return fast if _attention_passes(module, fast, heads, kv_heads, head_dim) else None


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


def _attention_passes(module: nn.Module, fast: Callable[..., Any], heads: int, kv_heads: int, head_dim: int) -> bool:
    """Stock and fused attention against float64 on a right-padded probe batch (real tokens only)."""
    dtype = module.q_proj.weight.dtype  # type: ignore[union-attr]
    batch, tokens = 2, 12
    window = getattr(module, "sliding_window", None)
    if window is not None:
        tokens = min(tokens, int(window))
    lengths = torch.tensor([tokens, max(1, tokens - 4)])
    real = torch.arange(tokens)[None, :] < lengths[:, None]
    mask = (torch.ones(tokens, tokens, dtype=torch.bool).tril() & real[:, None, :])[:, None]
    x = _probe((batch, tokens, module.q_proj.in_features), dtype, scale=2.0)  # type: ignore[union-attr]
    angle = torch.arange(tokens, dtype=torch.float64)[None, :, None] / (1.0 + torch.arange(head_dim // 2))
    angle = torch.cat([angle, angle], dim=-1).expand(batch, tokens, head_dim)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    try:
        with torch.inference_mode():
            ref = _attention_reference(module, x, cos, sin, mask, heads, kv_heads, head_dim)[real]
            norm = float(ref.norm()) or 1.0
            stock_err = float((module(x, (cos, sin), mask)[0].double()[real] - ref).norm()) / norm
            fast_err = float((fast(x, (cos, sin), mask)[0].double()[real] - ref).norm()) / norm
    except (RuntimeError, TypeError, ValueError):
        return False
    return stock_err <= 0.05 and fast_err <= stock_err * 1.05 + 1e-6


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


@contextmanager
def fused_blocks(loaded: LoadedModel, deepest: int, rows_hint: int) -> Iterator[Fused]:
    """Replacement forwards in blocks 0..deepest for the duration of the context; yields the counts.

    Only on CPU: RMSNorms at any dtype (bit-identical), linears, MLPs and attention in bfloat16
    (float32 would switch math library and rounding).
    """
    done = Fused()
    patched: list[nn.Module] = []
    blocks = list(decoder_layers(loaded.model)[: deepest + 1])
    ops = _onednn() if loaded.dtype == torch.bfloat16 else None
    pack = _Packer(ops, rows_hint) if ops is not None else None

    def install(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
        if forward is None:
            return False
        module.forward = forward  # type: ignore[method-assign]
        patched.append(module)
        return True

    try:
        if loaded.device.type == "cpu":
            for block in blocks:
                for module in block.modules():
                    if "forward" in vars(module):  # someone else's replacement: not ours to touch
                        continue
                    if install(module, _inplace_rms_norm(module)):
                        done.norms += 1
                    elif ops is not None and type(module) is nn.Linear:
                        done.linears += install(module, _packed_forward(ops, module, rows_hint, pack))
            for block in blocks:  # after the linears: these checks run the packed linears
                for module in block.modules():
                    if "forward" in vars(module):
                        continue
                    if ops is not None and install(module, _fused_mlp(ops, module, rows_hint, pack)):
                        done.mlps += 1
                    elif ops is not None and install(module, _fused_attention(module, ops, rows_hint)):
                        done.attentions += 1
        yield done
    finally:
        for module in patched:
            vars(module).pop("forward", None)
