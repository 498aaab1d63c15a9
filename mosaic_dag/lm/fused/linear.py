"""Linears on a weight oneDNN packs once per extraction instead of on every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mosaic_dag.lm.fused.base import _probe


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
