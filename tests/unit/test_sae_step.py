"""mosaic_dag.sae.step: the sparse TopK-family training step computes sae-lens's loss and gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.support.sae import low_rank_acts
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from mosaic_dag.sae.step import (
    SparseBatchTopKTrainingSAE,
    SparseTopKTrainingSAE,
    batch_topk_indices,
    sparse_step_ok,
    uses_sparse_step,
)
from mosaic_dag.sae.training import train_sae

D, W, B = 48, 384, 200


def _pair(stock_cls: type, cfg_cls: type, fast_cls: type, seed: int = 0) -> tuple[object, object]:
    cfg = cfg_cls(d_in=D, d_sae=W, k=6, dtype="float32", device="cpu", normalize_activations="expected_average_only_in")
    torch.manual_seed(seed)
    stock = stock_cls(cfg)
    with torch.no_grad():  # off the init (b_enc = 0, W_enc = W_dec.T) so every term of the gradient matters
        for p in stock.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fast = fast_cls(cfg)
    fast.load_state_dict(stock.state_dict())
    return stock, fast


def _step(sae: object, x: torch.Tensor, dead: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor, dict[str, torch.Tensor]]:
    sae.zero_grad()  # type: ignore[attr-defined]
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,  # type: ignore[attr-defined]
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    codes = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
    losses = {k: float(v) for k, v in out.losses.items()} | {"loss": float(out.loss)}
    return losses, codes.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("stock_cls", "cfg_cls", "fast_cls"), [
    (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SparseBatchTopKTrainingSAE),
    (TopKTrainingSAE, TopKTrainingSAEConfig, SparseTopKTrainingSAE),
])
@pytest.mark.parametrize("dead_fraction", [0.0, 0.3, 1.0])
def test_sparse_step_matches_sae_lens_step(stock_cls: type, cfg_cls: type, fast_cls: type, dead_fraction: float) -> None:
    stock, fast = _pair(stock_cls, cfg_cls, fast_cls)
    assert uses_sparse_step(fast) and not uses_sparse_step(stock)
    x = torch.from_numpy(low_rank_acts(B, d=D, seed=3)) * 2 + 0.5
    dead = (torch.rand(W, generator=torch.Generator().manual_seed(1)) < dead_fraction) if dead_fraction else None
    ref_losses, ref_codes, ref_grads = _step(stock, x, dead)
    losses, codes, grads = _step(fast, x, dead)
    assert losses.keys() >= {"mse_loss", "auxiliary_reconstruction_loss", "loss"}
    for k, v in ref_losses.items():
        assert losses[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    if dead_fraction:
        assert losses["auxiliary_reconstruction_loss"] > 0
    assert torch.equal(codes != 0, ref_codes != 0)  # the same winners
    torch.testing.assert_close(codes, ref_codes, rtol=1e-5, atol=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()), msg=name)
    if isinstance(stock, BatchTopKTrainingSAE):
        assert float(fast.topk_threshold) == pytest.approx(float(stock.topk_threshold), rel=1e-6)  # type: ignore[attr-defined]


def test_batch_topk_indices_equal_torch_topk() -> None:
    g = torch.Generator().manual_seed(0)
    for shape, m in [((300, 4096), 300 * 16), ((64, 1000), 64 * 3), ((8, 64), 40)]:
        h = torch.randn(shape, generator=g)
        want = torch.sort(torch.topk(h.reshape(-1), m).indices).values
        got = batch_topk_indices(h, m)
        assert torch.equal(got, want), shape
    ties = torch.zeros(50, 400)
    ties[:, :3] = 1.0  # 150 ones, then a sea of equal zeros at the cut
    got = batch_topk_indices(ties, 200)
    assert got.numel() == 200 and torch.equal(got, torch.sort(got).values) and got.unique().numel() == 200
    assert float(ties.reshape(-1)[got].sum()) == 150.0


def test_hooked_sae_falls_back_to_sae_lens_step() -> None:
    _, fast = _pair(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SparseBatchTopKTrainingSAE)
    handle = fast.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o)  # type: ignore[attr-defined]
    try:
        assert not sparse_step_ok(fast)
        x = torch.from_numpy(low_rank_acts(B, d=D, seed=3))
        losses, codes, _ = _step(fast, x, None)
        assert not codes.is_sparse and losses["loss"] > 0
    finally:
        handle.remove()


def test_trained_sae_is_healthy_and_reproducible(tmp_path: Path) -> None:
    acts = low_rank_acts(6000, seed=4)
    kw = dict(hook_name="model.layers.6", model_name="google/gemma-3-270m", width=256, k=8, training_tokens=15_000,
              lr=4e-3, batch_size=256, seed=0)
    a = train_sae(acts, out_dir=tmp_path / "a", **kw)  # type: ignore[arg-type]
    b = train_sae(np.ascontiguousarray(acts.astype(np.float64)), out_dir=tmp_path / "b", **kw)  # type: ignore[arg-type]
    assert a.metrics["explained_variance"] > 0.8 and a.metrics["dead_fraction"] < 0.5
    assert 2 <= a.metrics["l0"] <= 40  # BatchTopK saved as JumpReLU: the learnt threshold sets L0
    # the float32 tensor made once from a float64 array feeds the same batches as the float32 array itself
    assert (tmp_path / "a" / "sae_weights.safetensors").read_bytes() == (tmp_path / "b" / "sae_weights.safetensors").read_bytes()
