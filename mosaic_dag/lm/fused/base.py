"""What every replacement shares: the once-per-reason refusal log, signature binding, probe inputs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__package__)
_reported: set[str] = set()


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


@dataclass
class Fused:
    """How many modules of each kind run a replacement forward."""

    linears: int = 0
    mlps: int = 0
    norms: int = 0
    attentions: int = 0

    def total(self) -> int:
        """Replaced modules of every kind."""
        return self.linears + self.mlps + self.norms + self.attentions


def _probe(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _onednn() -> Any:
    ops = getattr(torch.ops, "mkldnn", None)
    ok = (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
          and hasattr(ops, "_reorder_linear_weight"))
    return ops if ok else None
