"""The TopK-family SAE training step without the dense work the architecture does not need.

sae-lens's ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` step computes the dense [batch, width]
pre-activations (needed: top-k must see every latent), then scatters the k winners back into a dense
[batch, width] matrix and multiplies it by the decoder, and autograd runs the decoder's and the
encoder's backward as dense products too, plus one more dense product for ``b_dec``'s gradient
through the encoder input. Only k of every ``width`` entries are non-zero, so here only the encoder
forward is a dense product; the decoder forward is an ``embedding_bag`` over the winners, the
code gradient is a sampled product (``sampled_addmm``), the decoder- and encoder-weight gradients
are ``embedding_bag`` sums over the winners grouped by latent, and ``b_dec``'s gradient through the encoder is a
matrix-vector product. Same loss, same gradients up to float32 rounding (and one exact
simplification: sae-lens multiplies the codes by the decoder norm for the ranking and divides by it
again before decoding, whose gradients cancel; here they are left out).

The auxiliary (dead-latent) loss is computed on the dead latents' columns only. ``sparse_step_ok``
says where the fast step applies (CPU or GPU float32, no activation hooks, plain normalisation); the
SAE classes here fall back to sae-lens's own step anywhere else.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from sae_lens import BatchTopKTrainingSAE, TopKTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

__all__ = ["SparseBatchTopKTrainingSAE", "SparseTopKTrainingSAE", "batch_topk_indices", "sparse_step_ok", "step_flops", "uses_sparse_step"]

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output", "hook_sae_recons")


def sparse_step_ok(sae: Any) -> bool:
    """True where the sparse step computes exactly what sae-lens's step computes for this SAE."""
    cfg = sae.cfg
    hooked = any(getattr(sae, h)._forward_hooks for h in _HOOKS if hasattr(sae, h))
    return (not hooked and cfg.apply_b_dec_to_input and cfg.rescale_acts_by_decoder_norm
            and cfg.normalize_activations in ("none", "expected_average_only_in")
            and getattr(cfg, "reshape_activations", "none") == "none" and not sae.use_error_term
            and sae.W_enc.dtype == torch.float32 and not getattr(cfg, "use_sparse_activations", False))


def uses_sparse_step(sae: Any) -> bool:
    """True when ``sae``'s training step returns sparse codes from the sparse step."""
    return isinstance(sae, _SparseStepMixin) and sparse_step_ok(sae)


def batch_topk_indices(h: torch.Tensor, m: int) -> torch.Tensor:
    """Flat indices, ascending, of the ``m`` largest entries of ``h`` (the set ``torch.topk(h.flatten(), m)`` picks).

    A strided sample gives a threshold just below the m-th largest value; every entry above it is a
    candidate (found in index order), and the m-th largest candidate is the exact cut. Exact whenever
    there are at least ``m`` candidates (the m-th largest entry then lies above the threshold);
    otherwise, the full top-k. Of entries tied at the cut, the first ones are kept.
    """
    flat = h.reshape(-1)
    n = flat.numel()
    if m >= n // 8:
        return torch.sort(torch.topk(flat, m, sorted=False).indices).values
    stride = max(1, n // 65_536) | 1  # odd: a power-of-two width does not align the sample to columns
    sample = flat[::stride]
    want = min(sample.numel(), int(sample.numel() * m / n * 1.25) + 16)
    threshold = torch.topk(sample, want, sorted=False).values.min()
    cand = torch.nonzero(flat > threshold).squeeze(1)
    if cand.numel() < m:
        return torch.sort(torch.topk(flat, m, sorted=False).indices).values
    vals = flat[cand]
    cut = torch.kthvalue(vals, cand.numel() - m + 1).values  # the m-th largest
    above = vals > cut
    extra = m - int(above.sum())  # entries equal to the cut still to take (usually 1)
    keep = above | ((vals == cut) & (torch.cumsum(vals == cut, 0) <= extra))
    return cand[keep]


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR tensor of entries already sorted by row."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _t_products(rows: torch.Tensor, cols: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                shape: tuple[int, int]) -> list[torch.Tensor]:
    """M_i.T @ right_i for sparse [n, width] matrices M_i sharing one pattern, each [width, right_i.shape[1]].

    Row j of the product is a weighted sum of the rows of ``right_i`` at latent j's entries: one
    ``embedding_bag`` per product over the entries sorted by latent once (each output row written
    once, in parallel; a transposed-CSR product scatters into every output row instead).
    """
    perm = torch.argsort(cols, stable=True)
    idx = rows[perm]
    offsets = torch.zeros(shape[1], dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.bincount(cols, minlength=shape[1]).cumsum(0)[:-1]
    return [torch.nn.functional.embedding_bag(idx, right.detach(), offsets, mode="sum", per_sample_weights=vals.detach()[perm])
            for vals, right in pairs]


def _rowdot(rows: torch.Tensor, cols: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left[rows[e]] . right[cols[e]] for every entry, without a dense [len(left), len(right)] product."""
    pattern = _csr(rows, cols, torch.zeros(rows.numel(), dtype=left.dtype, device=left.device),
                   (left.shape[0], right.shape[0]))
    return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values()


def _decode(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, n_rows: int) -> torch.Tensor:
    """sum_e vals[e] * W_dec[cols[e]] into row rows[e] (entries sorted by row)."""
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.zeros(n_rows, dtype=torch.int64, device=rows.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)


class _Step(torch.autograd.Function):
    """(mse loss, aux loss) of a TopK-family SAE from the selected entries; sparse backward."""

    @staticmethod
    def forward(ctx: Any, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                b_dec: torch.Tensor, s: torch.Tensor, main: tuple[torch.Tensor, ...], aux: tuple[torch.Tensor, ...] | None,
                aux_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = sae_in.shape[0]
        rows, cols, a = main
        sae_out = _decode(rows, cols, a, W_dec, n) + b_dec
        diff = sae_out - sae_in
        mse = diff.pow(2).sum() / n
        aux_loss = sae_in.new_zeros(())
        rec_diff = None
        if aux is not None:
            arows, acols, pa = aux
            rec_diff = _decode(arows, acols, pa, W_dec, n) + diff  # recons - (sae_in - sae_out)
            aux_loss = aux_weight * rec_diff.pow(2).sum() / n
        ctx.aux_weight = aux_weight
        ctx.save_for_backward(W_enc, W_dec, s, diff, rows, cols, a,
                              *(aux if aux is not None else ()), *(() if rec_diff is None else (rec_diff,)))
        ctx.has_aux = aux is not None
        ctx.mark_non_differentiable(sae_out)
        return mse, aux_loss, sae_out

    @staticmethod
    def backward(ctx: Any, g_mse: torch.Tensor, g_aux: torch.Tensor, _g_out: Any) -> tuple[Any, ...]:
        W_enc, W_dec, s, diff, rows, cols, a, *rest = ctx.saved_tensors
        n, width = s.shape[0], W_dec.shape[0]
        g = diff * (2.0 * g_mse / n)  # d loss / d sae_out
        g_a = _rowdot(rows, cols, g, W_dec)  # d loss / d code at each winner = d loss / d pre there
        grad_W_dec, grad_W_encT = _t_products(rows, cols, [(a, g), (g_a, s)], (n, width))
        grad_b_enc = torch.zeros(width, dtype=s.dtype, device=s.device).index_add_(0, cols, g_a)
        if ctx.has_aux:
            arows, acols, pa, rec_diff = rest
            g_rec = rec_diff * (2.0 * ctx.aux_weight * g_aux / n)
            g_pa = _rowdot(arows, acols, g_rec, W_dec)
            aux_dec, aux_enc = _t_products(arows, acols, [(pa, g_rec), (g_pa, s)], (n, width))
            grad_W_dec += aux_dec
            grad_W_encT += aux_enc
            grad_b_enc.index_add_(0, acols, g_pa)
        # b_dec: directly through the decoder output, and -1 x through sae_in - b_dec into the encoder
        grad_b_dec = g.sum(0) - W_enc @ grad_b_enc
        return None, grad_W_encT.t().contiguous(), grad_b_enc, grad_W_dec, grad_b_dec, None, None, None, None


def _ranked_pre(s: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(s @ W_enc + b_enc) * norm, the pre-activations as sae-lens ranks them.

    On CPU the decoder norm is folded into the (small) weight and bias and the product runs through
    oneDNN on the transposed view: no [batch, width] bias copy or scaling pass, and oneDNN's fp32
    product beats ``addmm``'s BLAS on the CPUs we measured. Equal up to float32 rounding.
    """
    if s.device.type == "cpu" and _onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(s, (W_enc * norm).t(), b_enc * norm, "none", [], "")
    return torch.addmm(b_enc, s, W_enc).mul_(norm)


@functools.cache
def _onednn_linear() -> bool:
    """Whether this torch has oneDNN's linear op and it computes a small product correctly."""
    if not (torch.backends.mkldnn.is_available() and hasattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise")):
        return False
    x, w, b = (torch.linspace(-1.0, 1.0, n).reshape(shape) for n, shape in ((35, (5, 7)), (21, (7, 3)), (3, (3,))))  # no RNG draw
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w.t(), b, "none", [], "")
    except RuntimeError:
        return False
    return torch.allclose(got, torch.addmm(b, x, w), rtol=1e-5, atol=1e-5)


def _aux_entries(h: torch.Tensor, norm: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, ...]:
    """Per row, the k_aux largest pre-activations among dead latents (as sae-lens's aux loss picks them)."""
    dead_ids = torch.nonzero(dead).squeeze(1)
    sub = h.index_select(1, dead_ids)
    top = torch.topk(sub, k_aux, dim=1, sorted=False)
    cols = dead_ids[top.indices]  # [n, k_aux]
    n = h.shape[0]
    rows = torch.arange(n, device=h.device).repeat_interleave(k_aux)
    cols = cols.reshape(-1)
    order = torch.argsort(cols.view(n, k_aux), dim=1)  # within-row column order (CSR needs sorted rows only)
    cols = cols.view(n, k_aux).gather(1, order).reshape(-1)
    vals = top.values.gather(1, order).reshape(-1) / norm[cols]
    return rows, cols, vals


class _SparseStepMixin:
    """training_forward_pass through ``_Step`` where ``sparse_step_ok``; sae-lens's own step elsewhere."""

    def _winners(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not sparse_step_ok(self):
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        sae_in = step_input.sae_in.to(self.W_enc.dtype)  # type: ignore[attr-defined]
        n, width = sae_in.shape[0], int(self.cfg.d_sae)  # type: ignore[attr-defined]
        with torch.no_grad():
            s = sae_in - self.b_dec  # type: ignore[attr-defined]
            norm = self.W_dec.norm(dim=-1)  # type: ignore[attr-defined]
            h = _ranked_pre(s, self.W_enc, self.b_enc, norm)  # type: ignore[attr-defined]
            flat = self._winners(h)  # ascending = row-major = CSR order
            flat = flat[h.reshape(-1)[flat] > 0]  # ReLU: non-positive winners are codes of 0
            rows, cols = flat // width, flat % width
            v = h.reshape(-1)[flat]  # the codes sae-lens returns
            a = v / norm[cols]  # what its decoder multiplies W_dec by (codes / decoder norm)
            aux, aux_weight = None, 0.0
            dead = step_input.dead_neuron_mask
            num_dead = 0 if dead is None else int(dead.sum())
            if num_dead:
                k_aux = sae_in.shape[-1] // 2
                aux_weight = float(self.cfg.aux_loss_coefficient) * min(num_dead / k_aux, 1.0)  # type: ignore[attr-defined]
                aux = _aux_entries(h, norm, dead, min(k_aux, num_dead))  # type: ignore[arg-type]
        mse, aux_loss, sae_out = _Step.apply(sae_in, self.W_enc, self.b_enc, self.W_dec, self.b_dec,  # type: ignore[attr-defined]
                                             s, (rows, cols, a), aux, aux_weight)
        feature_acts = torch.sparse_coo_tensor(torch.stack([rows, cols]), v.detach(), (n, width), is_coalesced=True)
        losses = {"mse_loss": mse, "auxiliary_reconstruction_loss": aux_loss}
        out = TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=h,
                              loss=mse + aux_loss, losses=losses)
        self._after_step(v, out)
        return out

    def _after_step(self, codes: torch.Tensor, out: TrainStepOutput) -> None:
        pass


class SparseTopKTrainingSAE(_SparseStepMixin, TopKTrainingSAE):
    """sae-lens's TopK training SAE with the sparse step (k winners per token)."""

    def _winners(self, h: torch.Tensor) -> torch.Tensor:
        from mosaic_dag.sae.encode import grouped_topk

        ids = torch.sort(grouped_topk(h, int(self.cfg.k))[1], dim=1).values
        return (ids + torch.arange(h.shape[0], device=h.device)[:, None] * h.shape[1]).reshape(-1)


class SparseBatchTopKTrainingSAE(_SparseStepMixin, BatchTopKTrainingSAE):
    """sae-lens's BatchTopK training SAE with the sparse step (k x batch winners over the whole batch)."""

    def _winners(self, h: torch.Tensor) -> torch.Tensor:
        return batch_topk_indices(h, int(self.cfg.k * h.shape[0]))

    def _after_step(self, codes: torch.Tensor, out: TrainStepOutput) -> None:
        # sae-lens's threshold update: EMA of the smallest positive code of the batch
        if codes.numel():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * codes.min().to(self.topk_threshold.dtype)
        out.metrics["topk_threshold"] = self.topk_threshold


def step_flops(batch: int, d_in: int, width: int, nnz: int, aux_nnz: int = 0) -> dict[str, float]:
    """Arithmetic of one sparse step: the dense encoder product, and 2 x entries x d_in per sparse product.

    Sparse products: decoder forward, the decoder-weight and encoder-weight gradients and the sampled
    code gradient (4 per selected entry set: winners, and dead-latent entries of the aux loss, which
    also has its own decoder forward).
    """
    dense = 2.0 * batch * d_in * width
    sparse = 4 * 2.0 * nnz * d_in + (4 * 2.0 * aux_nnz * d_in if aux_nnz else 0.0)
    return {"dense": dense, "sparse": sparse, "total": dense + sparse}
