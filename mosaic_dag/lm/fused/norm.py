"""Gemma's RMSNorm on one float32 buffer, normalised in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mosaic_dag.lm.fused.base import _probe


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


def _gemma_norm_parts(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(1 + w in float32, eps) of a Gemma-style RMSNorm (checked bit for bit by ``_inplace_rms_norm``)."""
    if _inplace_rms_norm(module) is None:
        return None
    return 1.0 + module.weight.detach().float(), float(module.eps)  # type: ignore[union-attr, arg-type]
