"""Residual stream of a vision-language model's language model over images, with the tokens that count.

Gemma 3 multimodal (``Gemma3ForConditionalGeneration``) and PaliGemma (``PaliGemmaForConditionalGeneration``)
load through ``models.load_model`` like any model, plus their processor. Each image becomes one row:
the processor expands ``prompt_template`` (``{image}`` = where the image goes) into BOS, the image's soft
tokens and the prompt's words. The hooks are the text path's (``extract.forward_layers``): resid_post of
the language model's block L, and the pass stops after the deepest requested block.

Which tokens count is explicit (``tokens`` per dataset): ``image`` = the image soft tokens only,
``text`` = the prompt's words only, ``all`` = both. The selection is the cache's ``real_mask``, so every
pooling, the SAE's training tokens and its codes see exactly those tokens; BOS, padding and the
start/end-of-image markers never count. The shards also keep ``image_mask`` (which tokens are image
tokens), whatever the selection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaic_dag.errors import ModelError
from mosaic_dag.lm.models import LoadedModel

IMAGE_PLACEHOLDER = "{image}"
# The text model each PaliGemma's language model starts from: SAEs trained on that model (Gemma Scope)
# read it, which is the seed paper's setting (PaliGemma 2 3B image tokens read by Gemma Scope 2B SAEs).
LANGUAGE_MODELS = {
    "paligemma2-3b": "google/gemma-2-2b", "paligemma2-10b": "google/gemma-2-9b",
    "paligemma2-28b": "google/gemma-2-27b", "paligemma-3b": "google/gemma-2b",
}


def sae_model_name(hf_name: str) -> str:
    """The model name an SAE must have been trained on to read this model's language model."""
    key = hf_name.strip().lower().rstrip("/").split("/")[-1]
    for prefix, text_model in LANGUAGE_MODELS.items():
        if key.startswith(prefix + "-"):
            return text_model
    return hf_name


def is_vlm(src: str, kwargs: dict[str, Any]) -> bool:
    """True when the model's config has a vision tower (Gemma 3 multimodal, PaliGemma, ...)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(src, **kwargs), "vision_config", None) is not None


def load_vlm(src: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor) of an image-text-to-text model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(src, **kwargs)
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{src} has a vision tower but its processor ({type(processor).__name__}) reads no images")
    processor.tokenizer.padding_side = "right"  # real tokens keep their positions, as in text extraction
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, **kwargs)
    return model, processor.tokenizer, processor


def image_token_id(loaded: LoadedModel) -> int:
    """The id the model replaces by image features (the model's config, which its forward obeys)."""
    cfg = loaded.model.config
    value = getattr(cfg, "image_token_id", None)
    if value is None:
        value = getattr(cfg, "image_token_index", None)
    if value is None:
        raise ModelError(f"model {loaded.name!r} has no image_token_id in its config; it cannot read images")
    return int(value)


def marker_ids(loaded: LoadedModel) -> np.ndarray:
    """Start/end-of-image markers: neither image content nor prompt text."""
    cfg = loaded.model.config
    ids = [getattr(cfg, a, None) for a in ("boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index")]
    return np.asarray(sorted({int(i) for i in ids if i is not None}), dtype=np.int64)


def prompt_text(loaded: LoadedModel, template: str) -> str:
    """The template with ``{image}`` replaced by the processor's image placeholder."""
    if loaded.processor is None:
        raise ModelError(
            f"model {loaded.name!r} reads no images (no image processor); use a vision-language model such as "
            "google/gemma-3-4b-pt or google/paligemma2-3b-pt-224 for image datasets"
        )
    return template.replace(IMAGE_PLACEHOLDER, str(loaded.processor.image_token))


def selection(token_ids: np.ndarray, image_id: int, specials: np.ndarray, markers: np.ndarray,
              tokens: str) -> tuple[np.ndarray, np.ndarray]:
    """(real, image) masks over token ids: what counts under ``tokens``, and which are image tokens."""
    image = token_ids == image_id
    text = ~image & ~np.isin(token_ids, specials) & ~np.isin(token_ids, markers)
    if tokens == "image":
        return image, image
    if tokens == "text":
        return text, image
    if tokens == "all":
        return image | text, image
    raise ValueError(f"tokens must be image, text or all, not {tokens!r}")


def processor_inputs(loaded: LoadedModel, images: Sequence[Any], prompt: str) -> dict[str, torch.Tensor]:
    """The processor's tensors for a batch of images with one prompt each (right-padded)."""
    proc = loaded.processor
    # one image per row, nested: Gemma 3 needs it, PaliGemma takes it
    out = proc(images=[[img] for img in images], text=[prompt] * len(images), return_tensors="pt", padding=True)
    keep = {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in out}
    if "attention_mask" not in keep:
        keep["attention_mask"] = torch.ones_like(keep["input_ids"])
    keep["pixel_values"] = keep["pixel_values"].to(loaded.dtype)
    return keep


def image_batches(loaded: LoadedModel, pngs: Sequence[bytes], prompt: str, batch_tokens: int,
                  max_length: int) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(row positions, processor inputs) per batch of about ``batch_tokens`` tokens."""
    from mosaic_dag.data.images import decode_png

    if not pngs:
        return
    first = processor_inputs(loaded, [decode_png(pngs[0])], prompt)
    per_row = int(first["input_ids"].shape[1])
    if per_row > max_length:
        raise ModelError(
            f"model {loaded.name!r}: one image with its prompt takes {per_row} tokens but max_length is {max_length}; "
            f"raise models[{loaded.name}].max_length to at least {per_row} (images are never truncated)"
        )
    size = max(1, batch_tokens // per_row)
    for start in range(0, len(pngs), size):
        rows = np.arange(start, min(start + size, len(pngs)), dtype=np.int64)
        yield rows, processor_inputs(loaded, [decode_png(pngs[i]) for i in rows], prompt)


def extract_images_to_cache(
    loaded: LoadedModel,
    pngs: Sequence[bytes],
    layers: Sequence[int],
    targets: dict[int, Path],
    *,
    prompt_template: str,
    tokens: str,
    max_length: int,
    batch_tokens: int,
    shard_tokens: int = 32768,
    extra_manifest: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """One truncated forward per batch of images; one cache folder per layer, like ``extract_to_cache``.

    No fused blocks here: image tokens attend to each other both ways, which the fused attention does not do.
    """
    import json

    from mosaic_dag.paths import HIDDEN_CACHE_VERSION
    from mosaic_dag.lm.extract import ExtractionStats, _ShardWriter, check_layers, forward_layers, special_ids
    from mosaic_dag.storage import atomic_dir

    layers = sorted(set(layers))
    check_layers(loaded, layers)
    prompt = prompt_text(loaded, prompt_template)
    image_id = image_token_id(loaded)
    specials = special_ids(loaded.tokenizer)
    specials = specials[specials != image_id]
    markers = marker_ids(loaded)
    stats = ExtractionStats(texts=len(pngs), layers=list(layers))
    image_tokens = 0
    t0 = time.perf_counter()
    with ExitStack() as stack:
        folders = {layer: stack.enter_context(atomic_dir(targets[layer])) for layer in layers}
        writers = {layer: _ShardWriter(folders[layer], shard_tokens) for layer in layers}
        done = 0
        for rows, inputs in image_batches(loaded, pngs, prompt, batch_tokens, max_length):
            ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            outs = forward_layers(loaded, layers, ids, mask, **inputs)
            stats.forward_calls += 1
            stats.batches += 1
            keep = mask.bool()
            lengths = keep.sum(dim=1).numpy().astype(np.int64)
            tok_ids = ids[keep].numpy().astype(np.int32)
            real, image = selection(tok_ids, image_id, specials, markers, tokens)
            for layer in layers:
                h = outs[layer][keep.to(outs[layer].device)]
                writers[layer].add(rows, lengths, h.float().cpu().numpy(), tok_ids, real, image)
            del outs
            stats.tokens += int(lengths.sum())
            stats.real_tokens += int(real.sum())
            image_tokens += int(image.sum())
            done += len(rows)
            if progress:
                progress(done, stats.texts)
        stats.seconds = time.perf_counter() - t0
        for layer in layers:
            writers[layer].flush()
            manifest = {
                "version": HIDDEN_CACHE_VERSION, "model": loaded.name, "hf_name": loaded.hf_name, "fingerprint": loaded.fingerprint,
                "layer": layer, "hook": f"language_model.layers.{layer} (resid_post)", "d_model": loaded.d_model,
                "max_length": max_length, "texts": stats.texts, "tokens": stats.tokens,
                "real_tokens": stats.real_tokens, "image_tokens": image_tokens, "modality": "image",
                "token_selection": tokens, "prompt": prompt, "image_token_id": image_id,
                "shards": writers[layer].shards, "seconds": stats.seconds, **(extra_manifest or {}),
            }
            (folders[layer] / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return stats


def partition_hash(dataset_cfg: Any, frame: Any, content_hash: str) -> str:
    """Cache identity of a partition: its rows, plus for images the prompt and the token selection."""
    from mosaic_dag.data.images import is_image_frame
    from mosaic_dag.storage import stable_hash

    if not is_image_frame(frame):
        return content_hash
    return stable_hash([content_hash, dataset_cfg.prompt_template, dataset_cfg.token_selection])
