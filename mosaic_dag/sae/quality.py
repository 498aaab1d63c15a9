"""How good an SAE is on the task's own texts: reconstruction, sparsity, and what splicing it costs the model.

``measure_quality`` runs the language model three times over the same token batches:
clean; with the block-L output replaced by the SAE's reconstruction ("spliced"); and with it replaced
by zeros ("zero ablation"). Only real tokens are replaced — BOS/special tokens and padding keep their
clean values, as they do for every other step of mosaic. The next-token cross-entropy over real
target tokens gives ``ce_increase = ce_sae - ce_clean`` and the standard
``loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)`` (1 = as good as clean, 0 = no better
than deleting the layer's output). Explained variance, dead fraction and L0 come from
``mosaic_dag.sae.stats.encode_stats`` on the same real tokens unless the caller passes stats measured on
more data (the codes asset has them for every token of a partition).

``check_quality`` compares a measurement with configured floors and returns pass/fail with one line
naming the number and the floor it missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["QualityCheck", "SaeFloors", "SaeQuality", "check_quality", "measure_quality"]


@dataclass(frozen=True)
class SaeFloors:
    """Limits an SAE must meet on task data; None switches a limit off."""

    min_explained_variance: float | None = 0.5
    max_dead_fraction: float | None = None
    min_loss_recovered: float | None = 0.5
    min_l0: float | None = None
    max_l0: float | None = None


@dataclass(frozen=True)
class SaeQuality:
    n_tokens: int
    width: int
    mean_l0: float
    dead_fraction: float
    explained_variance: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_increase: float
    loss_recovered: float
    n_loss_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class QualityCheck:
    passed: bool
    line: str
    failures: tuple[str, ...] = ()


def check_quality(q: SaeQuality, floors: SaeFloors, name: str = "sae") -> QualityCheck:
    """Pass/fail against ``floors``; the line names each number that missed and its floor."""
    rules = [
        ("explained_variance", q.explained_variance, floors.min_explained_variance, ">="),
        ("dead_fraction", q.dead_fraction, floors.max_dead_fraction, "<="),
        ("loss_recovered", q.loss_recovered, floors.min_loss_recovered, ">="),
        ("mean_l0", q.mean_l0, floors.min_l0, ">="),
        ("mean_l0", q.mean_l0, floors.max_l0, "<="),
    ]
    failures = []
    for label, value, floor, op in rules:
        if floor is None or (label == "loss_recovered" and not np.isfinite(value)):
            continue  # loss recovered is undefined where zero ablation does not raise the loss
        ok = np.isfinite(value) and (value >= floor if op == ">=" else value <= floor)
        if not ok:
            failures.append(f"{label} {value:.3f} (must be {op} {floor:g})")
    if failures:
        return QualityCheck(False, f"sae {name}: " + "; ".join(failures), tuple(failures))
    shown = (f"explained_variance {q.explained_variance:.3f}, dead_fraction {q.dead_fraction:.3f}, "
             f"mean_l0 {q.mean_l0:.1f}, loss_recovered {q.loss_recovered:.3f}")
    return QualityCheck(True, f"sae {name}: meets its floors ({shown})")


def _decoder_block(model: Any, layer: int) -> Any:
    from mosaic_dag.lm.models import decoder_layers

    return decoder_layers(model)[layer]


def _token_ce(logits: Any, input_ids: Any, target_mask: Any) -> tuple[float, int]:
    """Summed next-token cross-entropy (float32) over targets where ``target_mask`` is set."""
    import torch

    pred = logits[:, :-1].float()
    tgt = input_ids[:, 1:]
    keep = target_mask[:, 1:].bool()
    if not bool(keep.any()):
        return 0.0, 0
    ce = torch.nn.functional.cross_entropy(pred[keep], tgt[keep], reduction="sum")
    return float(ce), int(keep.sum())


def measure_quality(
    loaded: Any,
    sae: Any,
    layer: int,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_tokens: int = 512,
    stats: Any | None = None,
) -> SaeQuality:
    """Explained variance, dead fraction, L0 and loss recovered of ``sae`` at block ``layer`` on ``texts``.

    ``batch_tokens`` stays small: every batch materialises [tokens, vocab] logits three times.
    """
    import torch

    from mosaic_dag.lm.extract import make_batches, special_ids, tokenize
    from mosaic_dag.sae.stats import encode_stats

    if not texts:
        raise ValueError("texts: need at least one text to measure an SAE on")
    tok = loaded.tokenizer
    ids, _ = tokenize(tok, texts, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    specials = torch.as_tensor(special_ids(tok), dtype=torch.long)
    block = _decoder_block(loaded.model, layer)
    sae_param = sae.W_dec
    mode: dict[str, Any] = {"kind": "clean", "real": None, "captured": []}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        real = mode["real"]
        if mode["kind"] == "clean":
            mode["captured"].append(hidden[real].float().cpu().numpy())
            return None
        new = hidden.clone()
        if mode["kind"] == "zero":
            new[real] = 0
        else:
            x = hidden[real].to(device=sae_param.device, dtype=sae_param.dtype)
            new[real] = sae.decode(sae.encode(x)).to(device=hidden.device, dtype=hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_targets = 0
    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for batch in make_batches(ids, batch_tokens, pad):
                input_ids = batch.input_ids.to(loaded.device)
                mask = batch.attention_mask.to(loaded.device)
                real = mask.bool() & ~torch.isin(input_ids, specials.to(input_ids.device))
                mode["real"] = real
                attn = None if bool(mask.all()) else mask
                for kind in ("clean", "sae", "zero"):
                    mode["kind"] = kind
                    logits = loaded.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
                    ce, n = _token_ce(logits, input_ids, real)
                    sums[kind] += ce
                    del logits
                n_targets += n
    finally:
        handle.remove()
    if stats is None:
        acts = np.concatenate(mode["captured"]) if mode["captured"] else np.zeros((0, int(sae.cfg.d_in)), np.float32)
        stats = encode_stats(sae, acts)
    ce = {k: v / max(1, n_targets) for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    recovered = (ce["zero"] - ce["sae"]) / gap if gap > 0 else float("nan")
    return SaeQuality(
        n_tokens=int(stats.n_tokens), width=int(stats.width), mean_l0=float(stats.mean_l0),
        dead_fraction=float(stats.dead_fraction), explained_variance=float(stats.explained_variance),
        ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"], ce_increase=ce["sae"] - ce["clean"],
        loss_recovered=float(recovered), n_loss_tokens=n_targets,
    )


def with_stats(q: SaeQuality, stats: Any) -> SaeQuality:
    """``q`` with reconstruction/sparsity numbers replaced by ones measured on more tokens."""
    return replace(q, n_tokens=int(stats.n_tokens), width=int(stats.width), mean_l0=float(stats.mean_l0),
                   dead_fraction=float(stats.dead_fraction), explained_variance=float(stats.explained_variance))


def floors_of(cfg: Any) -> SaeFloors:
    """The config's ``sae_quality`` floors."""
    q = cfg.sae_quality
    return SaeFloors(q.min_explained_variance, q.max_dead_fraction, q.min_loss_recovered, q.min_l0, q.max_l0)


def partition_quality(cfg: Any, target: Any, dataset: str, language: str, loaded: Any,
                      manifest: dict[str, Any], sae: Any, frame: Any) -> SaeQuality:
    """Quality of the target's SAE (``sae``) on one dataset partition (its rows, ``frame``), cached beside the results.

    Explained variance, dead fraction and L0 are the codes manifest's (every real token of the
    partition); loss recovered runs over the first ``sae_quality.texts`` train+validation texts.
    The measurement is keyed by the SAE, the hidden-state cache and the text count, so a rerun
    with nothing changed runs no forward pass.
    """
    import json

    from mosaic_dag.sae.stats import EncodeStats
    from mosaic_dag.paths import quality_file
    from mosaic_dag.storage import write_json

    n_texts = cfg.sae_quality.texts
    identity = {"sae": manifest["sae_identity"], "hidden": manifest["hidden_cache"], "texts": n_texts}
    path = quality_file(cfg, target, dataset, language, identity)
    if path.is_file():
        stored = json.loads(path.read_text())
        if "d_sae" in stored:  # written before the field was named width
            stored["width"] = stored.pop("d_sae")
        return SaeQuality(**stored)
    texts = frame.loc[frame["split"].isin(["train", "validation"]), "text"].astype(str).tolist()[:n_texts]
    stats = EncodeStats(n_tokens=int(manifest["real_tokens"]), width=int(manifest["width"]),
                        mean_l0=float(manifest["mean_l0"]), dead_fraction=float(manifest["dead_fraction"]),
                        explained_variance=float(manifest["explained_variance"]))
    q = measure_quality(loaded, sae, target.layer, texts, max_length=cfg.model(target.model).max_length, stats=stats)
    write_json(path, q.as_dict())
    return q
