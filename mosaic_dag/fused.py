"""Faster forwards for the blocks extraction runs, each checked against the model's own before use.

Extraction pushes every text through the same few blocks. On CPU in bfloat16 three things there cost
more than the arithmetic needs: oneDNN re-packs each linear weight on every call, a gated MLP runs
its activation and its product as two extra passes over a [tokens, intermediate] tensor, and each
RMSNorm allocates a fresh float32 tensor per step. ``fused_blocks`` swaps in forwards that pack once,
fold the activation and the product into the oneDNN products, and normalise in place.

Every replacement is tried on a fixed probe input first and kept only if it passes:
- linears and RMSNorms must give bit-identical outputs;
- a fused MLP cannot be bit-identical (its activation sees the float32 accumulator instead of a
  bfloat16-rounded one), so it must be at least as close as the stock forward to a float32
  evaluation of the same MLP.
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

    @property
    def total(self) -> int:
        return self.linears + self.mlps + self.norms


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


@contextmanager
def fused_blocks(loaded: LoadedModel, deepest: int, rows_hint: int) -> Iterator[Fused]:
    """Replacement forwards in blocks 0..deepest for the duration of the context; yields the counts.

    Only on CPU: RMSNorms at any dtype (bit-identical), linears and MLPs in bfloat16 (float32
    would switch math library and rounding).
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
            if ops is not None:
                for block in blocks:  # after the linears: the MLP's check runs its packed down_proj
                    for module in block.modules():
                        if "forward" not in vars(module) and install(module, _fused_mlp(ops, module, rows_hint, pack)):
                            done.mlps += 1
        yield done
    finally:
        for module in patched:
            vars(module).pop("forward", None)
