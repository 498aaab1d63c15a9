"""How well an SAE does on a dataset: L0, dead latents, reconstruction explained variance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from mosaic_dag.sae.encode import auto_chunk, check_acts, encode_sparse, fast_kind
from mosaic_dag.sae.spec import SaeCodesError

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["EncodeStats", "encode_stats"]


@dataclass(frozen=True)
class EncodeStats:
    """Quality of an SAE on a dataset, over real tokens only."""

    n_tokens: int
    width: int
    mean_l0: float  # active latents per real token
    dead_fraction: float  # latents never active on any real token
    explained_variance: float  # 1 - SSE / total variance of the activations (sae-lens definition)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n_tokens": self.n_tokens,
            "width": self.width,
            "mean_l0": self.mean_l0,
            "dead_fraction": self.dead_fraction,
            "explained_variance": self.explained_variance,
        }


def _sparse_decode(sae: SAE[Any], block: sp.csr_matrix) -> np.ndarray | None:
    """``sae.decode`` of CSR codes as a sparse x dense product (no dense [rows, width] codes), float64;
    None where sae-lens's decode does more than codes @ W_dec + b_dec (hooks, run-time norms, reshapes)."""
    import torch

    w = sae.W_dec
    if (w.device.type != "cpu" or w.dtype != torch.float32 or fast_kind(sae) is None
            or sae.hook_sae_recons._forward_hooks or sae.hook_sae_output._forward_hooks
            or getattr(sae.cfg, "reshape_activations", "none") != "none"
            or sae.cfg.normalize_activations not in ("none", "expected_average_only_in")):
        return None
    codes = sp.csr_matrix(block, dtype=np.float32, copy=True)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # TopK decode divides codes by the decoder norm
        with torch.inference_mode():
            inv = (1.0 / w.norm(dim=-1)).numpy()
        codes.data *= inv[codes.indices]
    with torch.inference_mode():
        out = codes @ w.detach().numpy()
        return out.astype(np.float64) + sae.b_dec.detach().double().numpy()


def encode_stats(
    sae: SAE[Any],
    acts: np.ndarray,
    codes: sp.csr_matrix | None = None,
    real_mask: np.ndarray | None = None,
    chunk_tokens: int | None = None,
) -> EncodeStats:
    """L0, dead-latent fraction and reconstruction explained variance on real tokens.

    Decodes ``codes`` (encoded here if not given) chunk by chunk and compares to ``acts``: TopK and
    JumpReLU SAEs as sparse codes x decoder (never a dense [tokens, width] block), others with
    ``sae.decode``; sums run in float64 so large datasets do not lose precision.
    """
    import torch

    acts = np.asarray(acts)
    check_acts(sae, acts, real_mask)
    if codes is None:
        codes = encode_sparse(sae, acts, chunk_tokens=chunk_tokens, real_mask=real_mask)
    codes = sp.csr_matrix(codes)
    if codes.shape != (acts.shape[0], int(sae.cfg.d_sae)):
        raise SaeCodesError(f"codes shape {codes.shape} does not match acts rows {acts.shape[0]} x sae width {int(sae.cfg.d_sae)}")
    width = int(sae.cfg.d_sae)
    chunk_tokens = auto_chunk(chunk_tokens, width if fast_kind(sae) is None else 1)  # sparse decode: no dense block
    param = sae.W_dec
    active = np.zeros(width, dtype=bool)
    n = 0
    nnz = 0
    sse = 0.0
    sum_x = np.zeros(acts.shape[1], dtype=np.float64)
    sum_sq = 0.0
    with torch.inference_mode():
        for start in range(0, acts.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, acts.shape[0])
            block = codes[start:stop]
            x = acts[start:stop].astype(np.float64)
            if real_mask is not None:
                keep = np.flatnonzero(np.asarray(real_mask[start:stop], dtype=bool))
                block, x = block[keep], x[keep]
            if x.shape[0] == 0:
                continue
            active[block.indices] = True
            nnz += block.nnz
            x_hat = _sparse_decode(sae, block)
            if x_hat is None:
                z = torch.from_numpy(block.toarray().astype(np.float32)).to(device=param.device, dtype=param.dtype)
                x_hat = sae.decode(z).double().cpu().numpy()
            sse += float(((x - x_hat) ** 2).sum())
            sum_x += x.sum(axis=0)
            sum_sq += float((x**2).sum())
            n += x.shape[0]
    if n == 0:
        return EncodeStats(n_tokens=0, width=width, mean_l0=0.0, dead_fraction=1.0, explained_variance=float("nan"))
    total_var = sum_sq - float((sum_x**2).sum()) / n
    ev = 1.0 - sse / total_var if total_var > 0 else float("nan")
    return EncodeStats(
        n_tokens=n,
        width=width,
        mean_l0=nnz / n,
        dead_fraction=float(1.0 - active.mean()),
        explained_variance=float(ev),
    )
