"""Train a small SAE locally with sae-lens's own trainer, from activations mosaic already has.

sae-lens's ``SAETrainer`` takes any iterator of activation batches (its ``DataProvider`` type), so we
feed it shuffled rows of the residual-stream array of the TRAIN texts instead of running a
TransformerLens model through ``ActivationsStore``. This is the same route sae-lens uses for its
synthetic-data training. The result is saved with ``save_inference_model`` so
``SAE.load_from_disk(out_dir)`` (and ``mosaic_dag.sae.loading.load_sae``) read it back, with metadata
(``model_name``, ``hook_name``, ``hf_hook_name``, ``hook_layer``) that ``sae_info`` and
``check_compatible`` understand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mosaic_dag.errors import MosaicError
from mosaic_dag.sae.registry import parse_layer
from mosaic_dag.storage import atomic_dir

__all__ = [
    "METRICS_FILENAME",
    "RECIPE_VERSION",
    "SaeTrainingError",
    "TrainedSae",
    "activation_batches",
    "read_training_metrics",
    "train_sae",
]

Architecture = Literal["batchtopk", "jumprelu", "topk", "standard"]
METRICS_FILENAME = "mosaic_training.json"
RECIPE_VERSION = 4  # 4: sparse TopK-family step, fused Adam (same maths, other float32 rounding). Part of a trained SAE's cache key: SAEs of an older recipe are retrained, not reused


class SaeTrainingError(MosaicError, ValueError):
    """Training inputs are unusable (shape, size, hyper-parameters)."""


@dataclass(frozen=True)
class TrainedSae:
    """Where the trained SAE lives and how good it is on (a sample of) its training tokens."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def activation_batches(
    acts: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    seed: int,
) -> Iterator[Any]:
    """Endless float32 torch batches of ``acts[rows]``, reshuffled every epoch with a seeded generator.

    Batches never straddle epochs, so every batch has exactly ``batch_size`` rows. ``acts`` becomes
    one float32 tensor up front (no copy when it already is a float32 array in memory; one copy for a
    memmap or another dtype), and each batch is a single row gather from it: no per-step file reads
    or dtype conversions.
    """
    import torch

    if rows.size < batch_size:
        raise SaeTrainingError(f"only {rows.size} training tokens for batch_size={batch_size}; lower batch_size or add texts")
    table = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32))
    rng = np.random.default_rng(seed)
    n_batches = rows.size // batch_size
    while True:
        order = rows[rng.permutation(rows.size)]
        for b in range(n_batches):
            idx = np.sort(order[b * batch_size : (b + 1) * batch_size])  # ascending rows: cache-friendly gather
            yield torch.index_select(table, 0, torch.from_numpy(idx))


def _curve_trainer(base: Any, every: int) -> Any:
    """sae-lens's SAETrainer that also records loss, L0 and dead fraction every ``every`` steps."""

    class CurveTrainer(base):  # type: ignore[misc, valid-type]
        curve: list[dict[str, float]]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _fuse_optimizer(self)

        def _train_step(self, sae: Any, sae_in: Any) -> Any:
            """sae-lens's step, with the firing statistics read off the sparse codes' latent ids.

            sae-lens sums the codes over the batch (``feature_acts.bool().float().sum(0)``); on sparse
            codes torch does that by sorting them, twice a step. A count per latent is the same number.
            """
            import torch
            from sae_lens.saes.sae import TrainStepInput

            from mosaic_dag.sae.step import uses_sparse_step

            if not uses_sparse_step(sae):
                return super()._train_step(sae, sae_in)
            sae.train()
            with self.autocast_if_enabled:
                out = sae.training_forward_pass(step_input=TrainStepInput(
                    sae_in=sae_in, dead_neuron_mask=self.dead_neurons, coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps, is_logging_step=self._is_logging_step()))
                with torch.no_grad():
                    fired = torch.bincount(out.feature_acts._indices()[1], minlength=int(sae.cfg.d_sae))
                    self.n_forward_passes_since_fired += 1
                    self.n_forward_passes_since_fired[fired > 0] = 0
                    self.act_freq_scores += fired.to(self.act_freq_scores.dtype)
                    self.n_frac_active_samples += self.cfg.train_batch_size_samples
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.lr_scheduler.step()
            for scheduler in self.coefficient_schedulers.values():
                scheduler.step()
            return out

        def step(self, batch: Any) -> Any:
            out = super().step(batch)
            n = self.n_training_steps
            if n % every == 0 or self.n_training_samples >= self.cfg.total_training_samples:
                acts = out.feature_acts
                nonzero = float((acts.coalesce().values() != 0).sum()) if acts.is_sparse else float((acts != 0).sum())
                point = {"step": int(n), "loss": float(out.loss.detach()),
                         "l0": nonzero / max(1, acts.shape[0]),
                         "dead_fraction": float(self.dead_neurons.float().mean()),
                         "lr": float(self.optimizer.param_groups[0]["lr"])}
                point |= {k: float(v.detach() if hasattr(v, "detach") else v) for k, v in out.losses.items()}
                self.curve.append(point)
            return out

    return CurveTrainer


def _fuse_optimizer(trainer: Any) -> None:
    """The trainer's Adam, as one fused kernel per parameter (same update; the loop version makes ~10
    passes over each weight, as long as the sparse step's products on a 4k-wide SAE). Its learning-rate
    schedule is rebuilt on the new optimizer with the trainer's own settings."""
    import torch
    from sae_lens.training.optim import get_lr_scheduler

    cfg = trainer.cfg
    try:
        opt = torch.optim.Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    except (RuntimeError, TypeError, ValueError):  # a torch or device without fused Adam: keep sae-lens's
        return
    trainer.optimizer = opt
    trainer.lr_scheduler = get_lr_scheduler(
        cfg.lr_scheduler_name, lr=cfg.lr, optimizer=opt, warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps, training_steps=cfg.total_training_steps, lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles)


def _init_b_dec(trainer: Any, sae: Any, acts: np.ndarray, rows: np.ndarray, seed: int, n: int = 20_000) -> None:
    """b_dec := mean activation; fixes the scaling factor the trainer would estimate from the same rows."""
    import torch

    sample = rows if rows.size <= n else np.sort(np.random.default_rng(seed + 2).choice(rows, n, replace=False))
    x = np.asarray(acts[sample], dtype=np.float64)
    factor = 1.0
    if sae.cfg.normalize_activations == "expected_average_only_in":
        factor = float(np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1).mean())
        trainer.activation_scaler.scaling_factor = factor
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(x.mean(axis=0) * factor).to(sae.b_dec.dtype))


def _training_sae(
    architecture: Architecture,
    d_in: int,
    width: int,
    k: int,
    sparsity_coefficient: float | None,
    metadata: dict[str, Any],
    aux_loss_coefficient: float = 1.0,
) -> Any:
    """Build the sae-lens training SAE for ``architecture`` (weights use torch's global RNG)."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    from mosaic_dag.sae.step import SparseBatchTopKTrainingSAE, SparseTopKTrainingSAE

    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": width,
        "dtype": "float32",
        "device": "cpu",
        # Residual streams have large, model-specific norms; sae-lens rescales to sqrt(d_in) during
        # training and folds the factor into the saved weights, so inference takes raw activations.
        "normalize_activations": "expected_average_only_in",
        "metadata": SAEMetadata(**metadata),
    }
    if architecture == "batchtopk":
        return SparseBatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(k), aux_loss_coefficient=aux_loss_coefficient, **common))
    if architecture == "topk":
        return SparseTopKTrainingSAE(TopKTrainingSAEConfig(k=k, aux_loss_coefficient=aux_loss_coefficient, **common))
    if architecture == "jumprelu":
        # Gemma Scope 2 style: a quadratic penalty pulls the mean L0 towards k.
        cfg = JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=float(k),
            l0_coefficient=1e-3 if sparsity_coefficient is None else sparsity_coefficient,
            **common,
        )
        return JumpReLUTrainingSAE(cfg)
    if architecture == "standard":
        cfg_std = StandardTrainingSAEConfig(l1_coefficient=1.0 if sparsity_coefficient is None else sparsity_coefficient, **common)
        return StandardTrainingSAE(cfg_std)
    raise SaeTrainingError(f"architecture {architecture!r} is not one of batchtopk, jumprelu, topk, standard")


def train_sae(
    acts: np.ndarray | Sequence[np.ndarray],
    *,
    hook_name: str,
    model_name: str,
    out_dir: str | Path,
    training_tokens: int,
    architecture: Architecture = "batchtopk",
    width: int = 4096,
    k: int = 32,
    sparsity_coefficient: float | None = None,
    lr: float = 3e-4,
    batch_size: int = 1024,
    seed: int = 0,
    layer: int | None = None,
    real_mask: np.ndarray | None = None,
    lr_warm_up_steps: int | None = None,
    lr_decay_fraction: float = 0.2,
    aux_loss_coefficient: float = 1.0,
    dead_window_tokens: int | None = None,
    eval_tokens: int = 50_000,
    held_out: np.ndarray | None = None,
    curve_points: int = 50,
    init_b_dec: bool = True,
) -> TrainedSae:
    """Train an SAE on ``acts`` [n_tokens, d_model] (TRAIN texts only) and save it to ``out_dir``.

    - ``k``: active latents per token (batchtopk / topk), or the target mean L0 (jumprelu).
    - ``sparsity_coefficient``: l0 coefficient (jumprelu) or l1 coefficient (standard); ignored by top-k.
    - ``training_tokens``: tokens shown to the trainer; more than the data means several shuffled epochs.
    - ``real_mask``: rows to train on (False = BOS / padding, which would otherwise dominate the loss).
    - learning rate: linear warm-up over ``lr_warm_up_steps`` (None: 5% of the steps), then constant,
      then (sae-lens's schedule) a linear decay to 0 over the last ``lr_decay_fraction`` of the steps.
    - ``aux_loss_coefficient``: weight of the TopK-family auxiliary loss that trains dead latents to
      reconstruct the residual error; a latent counts as dead once it has not fired for
      ``dead_window_tokens`` tokens (None: 100 x width / k, i.e. ~100 expected firings of an average
      latent; 10 to 1000 steps).
    - ``held_out``: activations of texts NOT trained on (e.g. the validation split); the reported
      ``l0``, ``explained_variance`` and ``dead_fraction`` are measured there (else on training tokens),
      and ``train_*`` on a sample of the training tokens.
    - ``init_b_dec``: start the decoder bias at the mean training activation (in the trainer's
      normalised units), so the large shared component of the residual stream does not hand the
      top-k to the few latents aligned with it from the first step.
    - ``curve_points``: the training curve (loss, L0, dead fraction over steps) has about this many points.

    Deterministic for a seed on CPU; nothing is logged to wandb. ``out_dir`` appears complete or not at all.
    """
    import torch
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from mosaic_dag.sae.integrity import write_checksums
    from mosaic_dag.sae.stats import encode_stats

    t0 = time.perf_counter()
    if not isinstance(acts, np.ndarray):
        acts = np.concatenate([np.asarray(a) for a in acts], axis=0)
    if acts.ndim != 2:
        raise SaeTrainingError(f"acts must be 2-D [n_tokens, d_model], got shape {acts.shape}")
    if width < 1 or k < 1 or (architecture in ("batchtopk", "topk") and k > width):
        raise SaeTrainingError(f"need 1 <= k <= width, got k={k} width={width}")
    if batch_size < 1 or training_tokens < batch_size:
        raise SaeTrainingError(f"training_tokens={training_tokens} must be >= batch_size={batch_size} >= 1")
    if lr <= 0:
        raise SaeTrainingError(f"lr must be > 0, got {lr}")
    layer = parse_layer(hook_name) if layer is None else layer
    if layer is None:
        raise SaeTrainingError(f"cannot read a layer from hook_name {hook_name!r}; pass layer= or use 'model.layers.<L>'")
    if real_mask is not None:
        real_mask = np.asarray(real_mask, dtype=bool)
        if real_mask.shape != (acts.shape[0],):
            raise SaeTrainingError(f"real_mask must have one entry per token ({acts.shape[0]}), got shape {real_mask.shape}")
        rows = np.flatnonzero(real_mask)
    else:
        rows = np.arange(acts.shape[0])
    if rows.size < batch_size:
        raise SaeTrainingError(f"only {rows.size} real training tokens for batch_size={batch_size}; lower batch_size or add texts")
    sample = np.asarray(acts[rows[: min(rows.size, 4096)]], dtype=np.float32)
    if not np.isfinite(sample).all():
        raise SaeTrainingError("acts contain NaN or inf; check the model dtype (float16 overflow?) before training")

    d_in = int(acts.shape[1])
    metadata = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hf_hook_name": f"model.layers.{layer}.output",  # residual stream after block `layer`
        "hook_layer": int(layer),
        "prepend_bos": True,
        "dataset_path": None,
    }
    steps = training_tokens // batch_size
    norm_batches = max(1, min(1000, rows.size // batch_size))
    warm_up = max(0, int(round(0.05 * steps))) if lr_warm_up_steps is None else int(lr_warm_up_steps)
    decay = max(0, min(steps - warm_up, int(round(lr_decay_fraction * steps))))
    # an average latent fires on k/width of the tokens: ~100 expected firings without one marks it dead
    window_tokens = 100 * width // max(1, k) if dead_window_tokens is None else int(dead_window_tokens)
    dead_window = max(10, min(1000, window_tokens // batch_size))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warm_up,
        lr_decay_steps=decay,
        device="cpu",
        autocast=False,
        dead_feature_window=dead_window,
        feature_sampling_window=max(10, min(2000, steps)),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=norm_batches,
    )

    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG state alone
        torch.manual_seed(seed)
        sae = _training_sae(architecture, d_in, width, k, sparsity_coefficient, metadata, aux_loss_coefficient)
        trainer = _curve_trainer(SAETrainer, max(1, steps // max(1, curve_points)))(
            cfg=trainer_cfg, sae=sae, data_provider=activation_batches(acts, rows, batch_size, seed))
        trainer.curve = []
        if init_b_dec:
            _init_b_dec(trainer, sae, acts, rows, seed)
        trainer.fit()
    train_l0 = sae.cfg.metadata.get("l0")

    with atomic_dir(out) as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(str(tmp), device="cpu")
        rng = np.random.default_rng(seed + 1)
        eval_rows = np.sort(rng.choice(rows, size=min(eval_tokens, rows.size), replace=False))
        train_stats = encode_stats(inference, np.asarray(acts[eval_rows], dtype=np.float32))
        stats = train_stats
        if held_out is not None and len(held_out):
            stats = encode_stats(inference, np.asarray(held_out[:eval_tokens], dtype=np.float32))
        metrics: dict[str, Any] = {
            "architecture": architecture,
            "inference_architecture": str(inference.cfg.architecture()),
            "d_in": d_in,
            "width": width,
            "k": k,
            "sparsity_coefficient": sparsity_coefficient,
            "lr": lr,
            "lr_warm_up_steps": warm_up,
            "lr_decay_steps": decay,
            "aux_loss_coefficient": aux_loss_coefficient,
            "dead_feature_window_steps": dead_window,
            "epochs": round(steps * batch_size / rows.size, 2),
            "tokens_per_latent": round(rows.size / width, 2),
            "batch_size": batch_size,
            "seed": seed,
            "steps": steps,
            "training_tokens": int(trainer.n_training_samples),
            "available_tokens": int(rows.size),
            "model_name": model_name,
            "hook_name": hook_name,
            "layer": int(layer),
            "train_window_l0": None if train_l0 is None else float(train_l0),
            "eval_on": "held_out" if stats is not train_stats else "train",
            "eval_tokens": stats.n_tokens,
            "l0": stats.mean_l0,
            "explained_variance": stats.explained_variance,
            "dead_fraction": stats.dead_fraction,
            "train_l0": train_stats.mean_l0,
            "train_explained_variance": train_stats.explained_variance,
            "train_dead_fraction": train_stats.dead_fraction,
            "curve": trainer.curve,
            "wall_time_s": round(time.perf_counter() - t0, 3),
        }
        (tmp / METRICS_FILENAME).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_checksums(tmp)  # last, like a hidden-state manifest: a flipped byte later is caught on load
    return TrainedSae(path=out, metrics=metrics)


def read_training_metrics(path: str | Path) -> dict[str, Any] | None:
    """Metrics ``train_sae`` wrote beside the SAE, or None for folders it did not write."""
    f = Path(path) / METRICS_FILENAME
    return json.loads(f.read_text()) if f.is_file() else None

