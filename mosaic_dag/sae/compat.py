"""What an SAE reads (from its sae-lens config and metadata) and whether it fits a model's layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mosaic_dag.sae.registry import Site, models_match, parse_layer, parse_site, resid_post_layer
from mosaic_dag.sae.spec import SaeMismatchError

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["SIGNED_ARCHITECTURES", "SaeInfo", "check_compatible", "sae_info"]

# Architectures whose codes may be negative (sign kept after a top-k on |pre-activation|).
SIGNED_ARCHITECTURES: frozenset[str] = frozenset({"abstopk"})


@dataclass(frozen=True)
class SaeInfo:
    """What an SAE expects as input, read from its sae-lens config and metadata."""

    d_in: int
    width: int  # latents (sae-lens's cfg.d_sae)
    architecture: str
    hook_name: str | None
    layer: int | None  # mosaic convention: residual stream after block `layer`; None if unknown
    site: Site | None  # which activation it reads; None if its names do not say
    model_name: str | None
    signed: bool  # codes can be negative (e.g. abs-TopK)
    neuronpedia_id: str | None = None


def sae_info(sae: SAE[Any], hint: str | None = None) -> SaeInfo:
    """Describe ``sae``; ``hint`` (e.g. a registry path ``resid_post/layer_6_...``) helps when metadata is thin."""
    cfg = sae.cfg
    meta = cfg.metadata
    hook_name = meta.get("hook_name")
    hf_hook = meta.get("hf_hook_name")
    architecture = str(cfg.architecture())
    names = [str(n) for n in (hook_name, hf_hook, hint) if n]
    site = parse_site(*names)

    block: int | None = None
    stored = meta.get("hook_layer")
    if isinstance(stored, int) and not isinstance(stored, bool):
        block = stored
    for name in names:
        if block is not None:
            break
        block = parse_layer(name)
    if site is None:
        layer = block  # e.g. "layer_6": no site named, take it as our residual stream
    elif site in ("resid_post", "resid_pre"):
        layer = resid_post_layer(site, block)
    else:
        layer = block

    training_arch = meta.get("training_architecture")
    signed = architecture in SIGNED_ARCHITECTURES or training_arch in SIGNED_ARCHITECTURES or bool(meta.get("signed"))
    np_id = meta.get("neuronpedia_id")
    model_name = meta.get("model_name")
    return SaeInfo(
        d_in=int(cfg.d_in),
        width=int(cfg.d_sae),
        architecture=architecture,
        hook_name=str(hook_name) if hook_name else (str(hf_hook) if hf_hook else None),
        layer=layer,
        site=site,
        model_name=str(model_name) if model_name else None,
        signed=signed,
        neuronpedia_id=str(np_id) if np_id else None,
    )


def check_compatible(info: SaeInfo, model_name: str, d_model: int, layer: int) -> None:
    """Raise ``SaeMismatchError`` (naming both sides) if the SAE cannot read this model's layer.

    Cheap and model-free: call it before any forward pass so a wrong pairing fails in seconds.
    """
    if info.d_in != d_model:
        raise SaeMismatchError(
            f"sae d_in={info.d_in} does not match model {model_name} d_model={d_model}; pick an SAE trained on this model"
        )
    if info.site is not None and info.site not in ("resid_post", "resid_pre"):
        raise SaeMismatchError(
            f"sae reads {info.site} ({info.hook_name}) but mosaic captures the residual stream of model {model_name}; "
            "pick a resid_post SAE"
        )
    if info.layer is not None and info.layer != layer:
        raise SaeMismatchError(
            f"sae layer={info.layer} ({info.hook_name}) does not match model {model_name} layer={layer}; "
            f"use the SAE for layer {layer} or capture layer {info.layer}"
        )
    if info.site == "resid_pre" and info.layer is None:
        raise SaeMismatchError(f"sae reads the embeddings ({info.hook_name}), not model {model_name} layer={layer}; pick a later-layer SAE")
    if info.model_name and model_name and not models_match(info.model_name, model_name):
        raise SaeMismatchError(
            f"sae model_name={info.model_name} does not match model {model_name}; pick an SAE trained on {model_name}"
        )

