"""The entry: install every replacement that passes its check in the blocks extraction runs, then check them together."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mosaic_dag.lm.fused.attention import _fused_attention
from mosaic_dag.lm.fused.base import Fused, _one_input, _onednn, _refuse
from mosaic_dag.lm.fused.linear import _Packer, _packed_forward
from mosaic_dag.lm.fused.mlp import _fused_mlp
from mosaic_dag.lm.fused.norm import _inplace_rms_norm
from mosaic_dag.lm.models import LoadedModel, decoder_layers


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
