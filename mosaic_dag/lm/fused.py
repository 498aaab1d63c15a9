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
Anything that fails, or any module of another shape, keeps its own forward. Replacements bind to the
installed module's real signature (``inspect``), pass every call they do not handle to the stock forward
exactly as received, and are checked once more as a whole: a short probe batch through the patched
blocks must match the stock blocks, else every replacement is removed. A transformers release that moves
a signature can make extraction slower, never wrong. Each refusal is logged once, with its reason. The
model's forwards come back on exit, even on error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mosaic_dag.lm.models import LoadedModel, decoder_layers

log = logging.getLogger(__name__)
_reported: set[str] = set()

# Keywords that mean "attend over a cache": any of them set sends the call to the stock forward.
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Extra keywords the fused attention may ignore (rotary is already in ``position_embeddings``).
_HARMLESS_KEYWORDS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions"})


def _refuse(what: str, reason: str) -> None:
    """Log once per reason that a replacement is not used: the stock forward runs instead."""
    key = f"{what}: {reason}"
    if key not in _reported:
        _reported.add(key)
        log.warning("fused forward not used for %s, the stock forward runs: %s", what, reason)


def _signature(forward: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _one_input(stock: Callable[..., Any], fast: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any] | None:
    """``fast`` behind the stock forward's signature: used for a call with only the first input, given by
    position or by its name; any other call goes to the stock forward as it came."""
    sig = _signature(stock)
    params = list(sig.parameters.values()) if sig is not None else []
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    name = params[0].name

    def forward(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            return fast(args[0])
        if not args and len(kwargs) == 1 and name in kwargs:
            return fast(kwargs[name])
        return stock(*args, **kwargs)

    return forward


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

    def install(module: nn.Module, forward: Callable[..., Any] | None, one_input: bool = True) -> bool:
        if forward is not None and one_input:
            forward = _one_input(module.forward, forward)
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
                    elif ops is not None and install(module, _fused_attention(module, ops, rows_hint), one_input=False):
                        done.attentions += 1
            if patched and not _blocks_agree(loaded, blocks, patched):
                for module in patched:
                    vars(module).pop("forward", None)
                patched.clear()
                done = Fused()
        yield done
    finally:
        for module in patched:
            vars(module).pop("forward", None)


class _StopProbe(Exception):
    pass


def _blocks_agree(loaded: LoadedModel, blocks: list[nn.Module], patched: list[nn.Module], tolerance: float = 0.05) -> bool:
    """A right-padded probe batch through the model, as extraction calls it, with and without the
    replacements: the deepest block's output on real tokens must agree within ``tolerance`` (relative)."""
    vocab = loaded.model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, (tuple, list)) else output).detach().float())
        raise _StopProbe

    def run() -> torch.Tensor:
        handle = blocks[-1].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                loaded.model.base_model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                        use_cache=False)
        except _StopProbe:
            pass
        finally:
            handle.remove()
        return captured.pop()[mask.bool()]

    try:
        fused = run()
        saved = {module: vars(module).pop("forward") for module in patched}
        try:
            stock = run()
        finally:
            for module, forward in saved.items():
                module.forward = forward  # type: ignore[method-assign]
    except Exception as exc:  # noqa: BLE001 - any failure: the stock forwards run
        _refuse("the decoder blocks", f"probe batch failed ({type(exc).__name__}: {exc})")
        return False
    error = float((fused - stock).norm()) / (float(stock.norm()) or 1.0)
    if not error <= tolerance:
        _refuse("the decoder blocks", f"probe batch differs from the stock blocks by {error:.3g} (> {tolerance})")
        return False
    return True
