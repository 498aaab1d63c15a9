"""A gated MLP as three oneDNN products, its activation and product folded into them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mosaic_dag.lm.fused.base import _probe
from mosaic_dag.lm.fused.linear import _Packer

# oneDNN post-ops tried on an MLP's activation, as (name, algorithm) of ``mkldnn._linear_pointwise``.
_POST_OPS: tuple[tuple[str, str], ...] = (("gelu", "tanh"), ("gelu", "none"), ("swish", ""), ("relu", ""))


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
