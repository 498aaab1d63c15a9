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

from mosaic_dag.lm.fused.base import Fused
from mosaic_dag.lm.fused.blocks import fused_blocks

__all__ = ["Fused", "fused_blocks"]
