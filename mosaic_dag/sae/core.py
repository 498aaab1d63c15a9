"""Sparse autoencoders for mosaic: load (sae-lens registry / local folder), check, encode to sparse codes.

Everything here works on plain numpy activations [n_tokens, d_model] taken from the residual stream
AFTER block L (the output of ``model.model.layers[L]`` in Hugging Face terms), so no language model
is needed to use an SAE. Codes are kept as ``scipy.sparse.csr_matrix`` (float16-precision values in
a float32 matrix, float16 on disk): SAE codes are ~99% zeros, and a dense [n_tokens, d_sae] array
would not fit in memory for real datasets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    field_validator,
    model_validator,
)

from mosaic_dag.errors import CacheError, MosaicError
from mosaic_dag.sae.registry import (
    Site,
    models_match,
    parse_layer,
    parse_site,
    resid_post_layer,
)
from mosaic_dag.storage import atomic_path

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # sae-lens pulls in torch and transformer-lens; import it only when used
    import torch
    from sae_lens import SAE

__all__ = [
    "CODES_FORMAT_VERSION",
    "EncodeStats",
    "SaeCodesError",
    "SaeInfo",
    "SaeLoadError",
    "SaeMismatchError",
    "SaeSpec",
    "SparseCodes",
    "check_compatible",
    "default_sae_name",
    "encode_sparse",
    "encode_stats",
    "load_codes",
    "load_sae",
    "sae_info",
    "save_codes",
]

CODES_FORMAT_VERSION = 1
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_DENSE_CHUNK_ELEMENTS = 1 << 25  # one dense [chunk, d_sae] float32 block: ~128 MB
_CACHE_CHUNK_ELEMENTS = 1 << 22  # ~16 MB: the fast path's pre-activations stay in cache until top-k reads them
_WIDE = 1 << 16  # wider SAEs are encoded in width tiles: pre-activations bounded, the encoder weight read once per chunk
_TILE_WIDTH = 1 << 14  # one tile of pre-activations: [chunk, 16k] float32 (64 MB at 1024 tokens)
_TILED_CHUNK_TOKENS = 1024
_PACK_MAX_BYTES = 1 << 28  # the fused encoder packs (copies) its weight only below 256 MB
# Architectures whose codes may be negative (sign kept after a top-k on |pre-activation|).
SIGNED_ARCHITECTURES: frozenset[str] = frozenset({"abstopk"})


class SaeMismatchError(MosaicError, ValueError):
    """The SAE does not fit the model/layer it is paired with (d_in, layer, model or hook site)."""


class SaeLoadError(MosaicError, ValueError):
    """The SAE cannot be loaded (unknown release/id, missing folder, offline and not cached)."""


class SaeCodesError(MosaicError, ValueError):
    """Arrays handed to ``save_codes`` / ``encode_sparse`` are inconsistent with each other."""


# --------------------------------------------------------------------------------------------
# Spec and naming
# --------------------------------------------------------------------------------------------

_ARCH_ABBREV = {"batchtopk": "btk", "jumprelu": "jr", "topk": "tk", "standard": "std"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "-", text).strip("-_") or "sae"


def _short_width(width: int) -> str:
    if width >= 1 << 20 and width % (1 << 20) == 0:
        return f"{width >> 20}m"
    if width >= 1024 and width % 1024 == 0:
        return f"{width // 1024}k"
    return str(width)


def default_sae_name(
    source: str,
    release: str | None = None,
    sae_id: str | None = None,
    path: str | None = None,
    architecture: str | None = None,
    width: int | None = None,
) -> str:
    """Short label for partition keys: ``gs2-16k-medium``, ``local-btk4k``, ``local-<folder>``.

    The layer is left out on purpose: it is its own partition dimension in mosaic.
    """
    if source == "registry":
        rel, sid = release or "", sae_id or ""
        m_rel = re.fullmatch(r"gemma-scope-2-[\d.]+[mb]-(pt|it)-res(-all)?", rel)
        m_id = re.fullmatch(r"layer_\d+_width_([0-9]+[kmKM]?)_l0_(\w+)", sid)
        if m_rel and m_id:
            prefix = "gs2" + ("-it" if m_rel.group(1) == "it" else "") + ("-all" if m_rel.group(2) else "")
            return _slug(f"{prefix}-{m_id.group(1)}-{m_id.group(2)}".replace("_", "-"))
        return _slug(f"{rel}-{sid}")
    if source == "train" and architecture:
        arch = _ARCH_ABBREV.get(architecture, architecture)
        return _slug(f"local-{arch}{_short_width(width) if width else ''}")
    if path:
        return _slug(f"local-{Path(path).name}")
    return "local"


class SaeSpec(BaseModel):
    """Where an SAE comes from. ``SaeSpec.model_validate(cfg, from_attributes=True)`` accepts config objects."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    source: Literal["registry", "local", "train"]
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    name: str = ""
    architecture: str | None = None  # only used for the default name of a trained SAE
    width: int | None = None  # idem

    @field_validator("name", mode="before")
    @classmethod
    def _none_name(cls, v: Any) -> Any:
        return "" if v is None else v  # config objects carry name=None for "derive it"

    @model_validator(mode="after")
    def _check(self) -> SaeSpec:
        if self.source == "registry" and not (self.release and self.sae_id):
            raise ValueError("sae source 'registry' needs both 'release' and 'sae_id' (see sae-lens pretrained_saes.yaml)")
        if self.source == "local" and not self.path:
            raise ValueError("sae source 'local' needs 'path' (a folder written by sae-lens save_model)")
        if not self.name:
            name = default_sae_name(self.source, self.release, self.sae_id, self.path, self.architecture, self.width)
            object.__setattr__(self, "name", name)  # frozen model: fill the derived default once
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_unreachable(err: BaseException) -> bool:
    """True if ``err`` (or what caused it) means "hub not reachable / file not in the local cache"."""
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: tuple[type[BaseException], ...] = (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        ConnectionError,
        TimeoutError,
    )
    try:
        import httpx

        kinds = (*kinds, httpx.TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx today
        pass
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _gemma_3_model_name(raw: str) -> str:
    """Same normalisation sae-lens applies to Gemma Scope 2 model names (``gemma-v3-270m-pt`` -> ``google/gemma-3-270m``)."""
    name = raw if "google" in raw else f"google/{raw}"
    name = name.replace("-v3", "-3")
    if "270m" in name:
        name = name.replace("-pt", "")
    return name


def _cached_gemma_3_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,  # noqa: ARG001 - part of the sae-lens converter signature
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """Gemma Scope 2 loader that touches only the local HF cache.

    sae-lens's own ``gemma_3`` loader reads tensor shapes with an HTTP range request even when the
    files are cached, so it cannot work offline. This one reads the same two files from the cache
    (``<folder>/config.json`` if present and ``<folder>/params.safetensors``) and builds the same
    config, so ``SAE.from_pretrained(..., converter=...)`` yields the same SAE.
    """
    import torch
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    if "transcoder" in folder_name or "clt" in folder_name:
        raise SaeLoadError(f"offline loading of Gemma Scope 2 transcoders ({folder_name}) is not supported; use a resid_post SAE")
    layer = parse_layer(folder_name)
    site = parse_site(folder_name)
    if layer is None or site not in ("resid_post", "mlp_out", "attn_out"):
        raise SaeLoadError(f"cannot tell hook site/layer from Gemma Scope 2 folder {folder_name!r}")
    hooks = {
        "resid_post": (f"blocks.{layer}.hook_resid_post", f"model.layers.{layer}.output"),
        "mlp_out": (f"blocks.{layer}.hook_mlp_out", f"model.layers.{layer}.post_feedforward_layernorm.output"),
        "attn_out": (f"blocks.{layer}.attn.hook_z", f"model.layers.{layer}.self_attn.o_proj.input"),
    }
    hook_name, hf_hook_default = hooks[site]

    try:
        cfg_file = hf_hub_download(repo_id, f"{folder_name}/config.json", local_files_only=True)
        raw_cfg: dict[str, Any] = json.loads(Path(cfg_file).read_text())
    except EntryNotFoundError:  # LocalEntryNotFoundError is a subclass: no config cached -> infer, as sae-lens does
        raw_cfg = {}
    if raw_cfg.get("architecture", "jump_relu") != "jump_relu":
        raise SaeLoadError(f"unexpected architecture {raw_cfg.get('architecture')!r} in {repo_id}/{folder_name}/config.json")
    weights_file = hf_hub_download(repo_id, "params.safetensors", subfolder=folder_name, local_files_only=True)

    dtype = str((cfg_overrides or {}).get("dtype", "float32"))
    torch_dtype = getattr(torch, dtype)
    raw = {k: v.to(device=device, dtype=torch_dtype) for k, v in load_file(weights_file, device="cpu").items()}
    d_in, d_sae = (int(s) for s in raw["w_enc"].shape)
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "device": device,
        "model_name": _gemma_3_model_name(str(raw_cfg.get("model_name") or repo_id.split("/")[-1].replace("gemma-scope-2", "gemma-3"))),
        "hook_name": hook_name,
        "hook_head_index": None,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hf_hook_name": raw_cfg.get("hf_hook_point_in", hf_hook_default),
    }
    if cfg_overrides:
        cfg.update(cfg_overrides)
    state = {
        "W_enc": raw["w_enc"],
        "W_dec": raw["w_dec"],
        "b_enc": raw["b_enc"],
        "b_dec": raw["b_dec"],
        "threshold": raw["threshold"],
    }
    return cfg, state, None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _load_registry_sae(release: str, sae_id: str, device: str, dtype: str) -> SAE[Any]:
    import sae_lens
    from huggingface_hub import constants as hf_constants
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        raise SaeLoadError(
            f"sae release {release!r} is not in the sae-lens {sae_lens.__version__} registry; "
            "check the spelling, upgrade sae-lens, or use source: local / train"
        )
    if sae_id not in lookup.saes_map:
        some = ", ".join(list(lookup.saes_map)[:3])
        raise SaeLoadError(f"sae_id {sae_id!r} is not in release {release!r}; valid ids look like: {some}, ...")

    is_gemma_3 = lookup.conversion_func == "gemma_3"
    # The env var too: huggingface_hub reads it only at import, so a late setting would be missed.
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    offline = bool(hf_constants.is_offline_mode()) or env_offline
    converter = _cached_gemma_3_loader if (offline and is_gemma_3) else None
    where = f"{lookup.repo_id}/{lookup.saes_map[sae_id]}"
    try:
        try:
            return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype, converter=converter)
        except Exception as err:
            # Online but the hub is unreachable: the files may still be in the cache.
            if converter is None and is_gemma_3 and _is_unreachable(err):
                return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype, converter=_cached_gemma_3_loader)
            raise
    except SaeLoadError:
        raise
    except Exception as err:
        if _is_unreachable(err):
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
            raise SaeLoadError(
                f"sae {release}/{sae_id} cannot be loaded: {why} and {where} is not in the local cache "
                f"({_hf_cache_dir()}); use sae source: train, or source: local with a folder saved by sae-lens"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SaeLoadError(f"sae {release}/{sae_id} failed to load ({type(err).__name__}: {first[:300]})") from err


def load_sae(
    spec: SaeSpec | Any | None = None,
    *,
    release: str | None = None,
    sae_id: str | None = None,
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> SAE[Any]:
    """Load an inference SAE with sae-lens: ``load_sae(spec)``, ``load_sae(release=.., sae_id=..)`` or ``load_sae(path=..)``.

    Registry SAEs come from the Hugging Face cache (downloaded when online); local and trained SAEs
    are folders written by sae-lens (``cfg.json`` + ``sae_weights.safetensors``).
    """
    try:
        if spec is None:
            if release or sae_id:
                spec = SaeSpec(source="registry", release=release, sae_id=sae_id)
            elif path is not None:
                spec = SaeSpec(source="local", path=str(path))
            else:
                raise SaeLoadError("load_sae needs a spec, release + sae_id, or path")
        elif not isinstance(spec, SaeSpec):
            spec = SaeSpec.model_validate(spec, from_attributes=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "sae"
        raise SaeLoadError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None

    if spec.source == "registry":
        assert spec.release is not None and spec.sae_id is not None  # validated by SaeSpec
        return _load_registry_sae(spec.release, spec.sae_id, device, dtype)

    if not spec.path:
        raise SaeLoadError(f"sae {spec.name!r} (source: {spec.source}) has no path yet; train it with train_sae first")
    folder = Path(spec.path).expanduser()
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise SaeLoadError(
            f"sae path {str(folder)!r} is not an sae-lens folder (needs cfg.json and sae_weights.safetensors); "
            "save it with sae.save_model(path) or train it with train_sae"
        )
    if verify_checksums(folder) is False:
        raise SaeLoadError(
            f"sae {spec.name or folder.name!r}: {str(folder)!r} failed its checksum (its files changed after they were "
            "written); restore the folder, or delete it so mosaic trains it again"
        )
    from sae_lens import SAE

    try:
        return SAE.load_from_disk(str(folder), device=device, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - safetensors/json/torch raise many types; the user needs one line
        text = str(err).strip()
        reason = f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__
        raise SaeLoadError(
            f"sae {spec.name or folder.name!r}: {str(folder)!r} could not be read ({reason}); "
            "the folder is truncated or corrupt: save the SAE again (sae.save_model) or point 'path' at a good copy"
        ) from None


# --------------------------------------------------------------------------------------------
# Integrity: checksums of SAE folders mosaic writes, and a sanity check of what an SAE reconstructs
# --------------------------------------------------------------------------------------------

CHECKSUM_FILENAME = "mosaic_checksums.json"
# Explained variance below this is not a weak SAE but a broken one (corrupt weights, wrong scaling).
# A weak SAE on data with a large mean and a small spread (image soft tokens of a small random vision
# tower, seen at -825) can score far below zero; corrupt weights score many orders further down.
ABSURD_EXPLAINED_VARIANCE = -1e4


def write_checksums(folder: str | Path) -> Path:
    """sha256 of every file in an SAE folder, written last (inside the folder's atomic write)."""
    from mosaic_dag.storage import file_sha256

    folder = Path(folder)
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUM_FILENAME}
    out = folder / CHECKSUM_FILENAME
    out.write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True))
    return out


def verify_checksums(folder: str | Path) -> bool | None:
    """True when every listed file matches; False when one differs or is missing; None: no checksums
    (an SAE that mosaic did not write, which ``check_reconstruction`` still guards)."""
    from mosaic_dag.storage import file_sha256

    folder = Path(folder)
    try:
        listed = json.loads((folder / CHECKSUM_FILENAME).read_text())["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        return all(file_sha256(folder / name) == digest for name, digest in listed.items())
    except OSError:
        return False


def discard_if_corrupt(folder: str | Path) -> bool:
    """Remove a trained-SAE folder (mosaic's own) whose checksum fails, so it is trained again; True if removed."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir() or verify_checksums(folder) is not False:
        return False
    log.warning("trained SAE %s failed its checksum; removing it so it is trained again", folder)
    shutil.rmtree(folder, ignore_errors=True)
    return True


def check_reconstruction(name: str, codes: sp.csr_matrix, stats: "EncodeStats") -> None:
    """Refuse an SAE whose codes are not finite or whose reconstruction is absurd on this data."""
    bad = int((~np.isfinite(codes.data)).sum()) if codes.nnz else 0
    if bad:
        raise SaeCodesError(
            f"sae {name!r} produced {bad} non-finite codes on this data; its weights are corrupt or do not fit "
            "this model: re-save or re-download the SAE, or delete a trained one so it is trained again"
        )
    ev = stats.explained_variance
    if stats.n_tokens and (ev < ABSURD_EXPLAINED_VARIANCE or ev == math.inf):
        raise SaeCodesError(
            f"sae {name!r} reconstructs this data absurdly (explained variance {ev:.3g}, below "
            f"{ABSURD_EXPLAINED_VARIANCE:g}); its weights are corrupt or do not fit this model/layer: "
            "re-save or re-download the SAE, or delete a trained one so it is trained again"
        )


# --------------------------------------------------------------------------------------------
# Introspection and compatibility
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaeInfo:
    """What an SAE expects as input, read from its sae-lens config and metadata."""

    d_in: int
    d_sae: int
    architecture: str
    hook_name: str | None
    layer: int | None  # mosaic convention: residual stream after block `layer`; None if unknown
    site: Site | None  # which activation it reads; None if its names do not say
    model_name: str | None
    signed: bool  # codes can be negative (e.g. abs-TopK)
    neuronpedia_id: str | None = None

    @property
    def width(self) -> int:
        return self.d_sae


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
        d_sae=int(cfg.d_sae),
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


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_acts(sae: SAE[Any], acts: np.ndarray, real_mask: np.ndarray | None) -> None:
    if acts.ndim != 2:
        raise SaeCodesError(f"acts must be 2-D [n_tokens, d_model], got shape {acts.shape}; flatten texts with offsets")
    if acts.shape[1] != int(sae.cfg.d_in):
        raise SaeMismatchError(
            f"sae d_in={int(sae.cfg.d_in)} does not match acts d_model={acts.shape[1]}; pick an SAE trained on this model"
        )
    if real_mask is not None and (real_mask.ndim != 1 or real_mask.shape[0] != acts.shape[0]):
        raise SaeCodesError(f"real_mask must be 1-D with {acts.shape[0]} entries (one per token), got shape {real_mask.shape}")


def _round_to_float16(block: sp.csr_matrix) -> tuple[sp.csr_matrix, int]:
    """Round float32 values to float16 precision (clipping overflow, dropping values that become 0).

    The result stays float32 because scipy cannot slice, copy or densify float16 sparse matrices;
    the values are float16-exact, so ``save_codes`` stores them as float16 without loss.
    Returns (block, number of clipped values).
    """
    block = block.astype(np.float32)
    over = np.abs(block.data) > _FLOAT16_MAX
    n_over = int(over.sum())
    if n_over:
        np.clip(block.data, -_FLOAT16_MAX, _FLOAT16_MAX, out=block.data)
    block.data = block.data.astype(np.float16).astype(np.float32)
    block.eliminate_zeros()
    return block, n_over


def _auto_chunk(chunk_tokens: int | None, d_sae: int, cache_sized: bool = False) -> int:
    """4096 tokens, fewer for wide SAEs so one dense float32 chunk stays near 128 MB.

    ``cache_sized`` (the CPU fast path, whose pre-activations are read once by top-k or the
    threshold right after the product): chunks of ~16 MB instead, which stay in cache — measured
    here 10-15% faster for 16k and 65k latents (256 and 64 tokens) than 4096-token chunks.
    """
    if chunk_tokens is None:
        budget = _CACHE_CHUNK_ELEMENTS if cache_sized else _DENSE_CHUNK_ELEMENTS
        return max(16, min(4096, budget // max(d_sae, 1)))
    if chunk_tokens < 1:
        raise SaeCodesError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return chunk_tokens


def _fast_kind(sae: SAE[Any]) -> str | None:
    """"topk" / "jumprelu" when encode_sparse may skip sae.encode's dense output for this SAE, else None.

    Only the plain sae-lens inference classes with their stock activation, and no hook on the codes
    (a hook must see, and may change, the dense codes).
    """
    from sae_lens import JumpReLUSAE
    from sae_lens.saes.topk_sae import TopK, TopKSAE
    from torch import nn

    if sae.hook_sae_acts_post._forward_hooks:
        return None
    if type(sae) is TopKSAE and type(sae.activation_fn) is TopK and not sae.activation_fn.use_sparse_activations:
        return "topk"
    if type(sae) is JumpReLUSAE and type(sae.activation_fn) is nn.ReLU:
        return "jumprelu"
    return None


def _encoder(sae: SAE[Any], rows_hint: int, scale: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> hidden_pre = process_sae_in(x) @ W_enc + b_enc (through ``hook_sae_acts_pre``), as sae-lens computes it,
    times ``scale`` per latent when given (TopK SAEs that rank by pre-activation x decoder norm).

    On CPU in float32 the product and the bias run as one oneDNN call with the weight packed once
    (measured here: 2.5 s instead of 3.1 s for 22k tokens x 16k latents, and no separate bias pass);
    ``scale`` is folded into that weight and bias unless a hook must see the unscaled values.
    Its values agree with sae-lens's expression to float32 rounding (~1e-6 relative), not bit for
    bit. Anywhere else, or if torch lacks the op, sae-lens's own expression.
    """
    import torch

    weight, bias = sae.W_enc, sae.b_enc

    def plain(x: torch.Tensor) -> torch.Tensor:
        pre = sae.hook_sae_acts_pre(sae.process_sae_in(x) @ weight + bias)
        return pre if scale is None else pre * scale

    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available()
            or weight.numel() * weight.element_size() > _PACK_MAX_BYTES):  # a wide SAE: no second copy of its weight
        return plain
    fold = scale is not None and not sae.hook_sae_acts_pre._forward_hooks
    try:
        w, b = (weight * scale, bias * scale) if fold else (weight, bias)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), max(1, rows_hint))
        linear = torch.ops.mkldnn._linear_pointwise

        def fused(x: torch.Tensor) -> torch.Tensor:
            pre = sae.hook_sae_acts_pre(linear(sae.process_sae_in(x).contiguous(), packed, b, "none", [], ""))
            return pre if fold or scale is None else pre.mul_(scale)

        probe = torch.linspace(-1.0, 1.0, 3 * weight.shape[0], dtype=weight.dtype).reshape(3, -1)
        if not torch.allclose(fused(probe), plain(probe), rtol=1e-4, atol=1e-5):
            return plain
    except (AttributeError, RuntimeError, NotImplementedError):
        return plain
    return fused


def _topk_parts(sae: SAE[Any], pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, latent ids) [n, k] of TopKSAE.encode from its (rescaled) pre-activations, without the dense scatter."""
    values, ids = grouped_topk(pre, int(sae.activation_fn.k))
    return values.relu(), ids


def grouped_topk(x: torch.Tensor, k: int, groups: tuple[int, ...] = (64, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k (values, indices; unordered) of a 2-D tensor, like ``torch.topk``, ~1.7x faster on wide rows.

    Split each row into groups of ``groups[0]``; the k groups with the largest maxima hold every
    top-k element (the k-th largest group maximum is <= the k-th largest element, and any element
    at least that large lies in a group whose maximum is too), so top-k runs on the k * group
    candidates instead of the whole row, and recursively with the next group size on those
    (64 then 8: measured fastest here for 16k and 65k latents). Exact up to which of several equal
    values is picked, as torch.topk itself.
    """
    import torch

    n, d = x.shape
    if not groups:
        return torch.topk(x, k, dim=1, sorted=False)
    group, rest = groups[0], groups[1:]
    if d % group or d // group < 2 * k:
        return grouped_topk(x, k, rest)
    split = x.view(n, d // group, group)
    best = torch.topk(split.amax(dim=2), k, dim=1, sorted=False).indices  # [n, k] group ids
    candidates = torch.gather(split, 1, best.unsqueeze(2).expand(n, k, group)).view(n, k * group)
    values, at = grouped_topk(candidates, k, rest)
    return values, best.gather(1, at // group) * group + at % group


def _tiled_codes(sae: SAE[Any], x: torch.Tensor, kind: str, scale: torch.Tensor | None,
                 tile: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, per-row counts) of a wide TopK / JumpReLU SAE's codes for one chunk, width tile by tile.

    Only a [chunk, tile] block of pre-activations exists at a time; TopK keeps a running top-k per
    row (merged with each tile's own top-k: exact), JumpReLU keeps each tile's above-threshold entries.
    The encoder weight is read in column tiles straight from the SAE (no copy).
    """
    import torch

    n, width = x.shape[0], int(sae.cfg.d_sae)
    tile = tile or _TILE_WIDTH
    s = sae.process_sae_in(x)
    k = int(sae.activation_fn.k) if kind == "topk" else 0
    best_v = best_i = None
    rows_l: list[torch.Tensor] = []
    cols_l: list[torch.Tensor] = []
    vals_l: list[torch.Tensor] = []
    # One set of [chunk, tile] buffers, reused by every tile: fresh 16-64 MB temporaries per tile,
    # interleaved with the small kept entries, fragment the heap (measured: +1 GB RSS at 262k latents).
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    floor = sae.threshold.clamp_min(0) if kind == "jumprelu" else None  # pre > threshold and pre > 0
    for j in range(0, width, tile):
        stop = min(j + tile, width)
        if stop - j not in buffers:
            buffers[stop - j] = (torch.empty(n, stop - j, dtype=s.dtype, device=s.device),
                                 torch.empty(n, stop - j, dtype=torch.bool, device=s.device))
        pre, keep = buffers[stop - j]
        torch.addmm(sae.b_enc[j:stop], s, sae.W_enc[:, j:stop], out=pre)
        if kind == "topk":
            if scale is not None:
                pre.mul_(scale[j:stop])
            v, i = grouped_topk(pre, min(k, stop - j))
            i = i + j
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                top = torch.topk(v, k, dim=1, sorted=False)
                v, i = top.values, i.gather(1, top.indices)
            best_v, best_i = v, i
        else:
            assert floor is not None
            torch.gt(pre, floor[j:stop], out=keep)
            nz = torch.nonzero(keep)  # row-major
            rows_l.append(nz[:, 0])
            cols_l.append(nz[:, 1] + j)
            vals_l.append(pre[keep])
    if kind == "topk":
        assert best_v is not None and best_i is not None
        order = torch.argsort(best_i, dim=1)
        data = torch.gather(best_v.relu(), 1, order).float().cpu().numpy().reshape(-1)
        indices = torch.gather(best_i, 1, order).cpu().numpy().reshape(-1).astype(np.int32)
        return data, indices, np.full(n, best_v.shape[1], dtype=np.int64)
    rows = torch.cat(rows_l).cpu().numpy()
    order = np.argsort(rows, kind="stable")  # tiles in column order: columns stay sorted within a row
    data = torch.cat(vals_l).float().cpu().numpy()[order]
    indices = torch.cat(cols_l).cpu().numpy()[order].astype(np.int32)
    return data, indices, np.bincount(rows, minlength=n).astype(np.int64)


def _masked_to_csr(pre: torch.Tensor, keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of ``pre`` where ``keep``, zero elsewhere, without a dense product."""
    import torch

    n, d = pre.shape
    flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
    data = pre.reshape(-1)[flat].float().cpu().numpy()
    flat_np = flat.cpu().numpy()
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat_np // d, minlength=n), out=indptr[1:])
    return data, (flat_np % d).astype(np.int32), indptr


def _dense_to_csr(z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of a dense [n, d] tensor, found with torch (~3x faster than scipy's scan)."""
    return _masked_to_csr(z, z != 0)


def encode_sparse(
    sae: SAE[Any],
    acts: np.ndarray,
    chunk_tokens: int | None = None,
    real_mask: np.ndarray | None = None,
) -> sp.csr_matrix:
    """``sae.encode`` over ``acts`` [n_tokens, d_in] in chunks -> CSR [n_tokens, d_sae] of float16 values.

    Runs in the SAE's own dtype (load it in bfloat16 to encode in bfloat16). The matrix dtype is
    float32 holding float16-rounded values: scipy cannot slice, copy or densify float16 sparse
    matrices, while ``save_codes`` still stores these values as float16 losslessly. At most one
    chunk of pre-activations is ever dense (``chunk_tokens=None``: 4096 rows, fewer for very wide
    SAEs). TopK and JumpReLU SAEs (Gemma Scope, BatchTopK for inference) go from pre-activations
    straight to CSR, with a fused encoder on CPU: equal to sae.encode up to float32 rounding (so a
    value may land one float16 step away, or a latent within ~1e-6 of the threshold may flip).
    Any other SAE class, or one with a hook on its codes, runs ``sae.encode`` itself. With
    ``real_mask`` given, rows of non-real tokens (BOS, padding) are left empty instead of encoded:
    they are never pooled, and BOS rows are costly outliers.
    """
    import torch

    acts = np.asarray(acts)
    _check_acts(sae, acts, real_mask)
    if str(sae.cfg.architecture()) == "batchtopk":
        raise SaeCodesError(
            "a BatchTopK *training* SAE picks top-k over the whole batch, so codes would depend on chunking; "
            "save it with save_inference_model and load that (a JumpReLU SAE)"
        )
    n_tokens, d_sae = acts.shape[0], int(sae.cfg.d_sae)
    param = sae.W_enc
    kind = _fast_kind(sae)
    tiled = kind is not None and d_sae > _WIDE and not sae.hook_sae_acts_pre._forward_hooks
    if tiled and chunk_tokens is None:
        chunk_tokens = _TILED_CHUNK_TOKENS
    chunk_tokens = _auto_chunk(chunk_tokens, d_sae, cache_sized=kind is not None and param.device.type == "cpu")
    keep = np.ones(n_tokens, dtype=bool) if real_mask is None else np.asarray(real_mask, dtype=bool)
    data_parts: list[np.ndarray] = []
    index_parts: list[np.ndarray] = []
    counts = np.zeros(n_tokens, dtype=np.int64)  # stored values per token row
    was_training = sae.training
    sae.eval()
    try:
        with torch.inference_mode():
            rescale = kind == "topk" and sae.cfg.rescale_acts_by_decoder_norm
            scale = sae.W_dec.norm(dim=-1) if rescale else None
            encoder = _encoder(sae, chunk_tokens, scale) if kind and not tiled else None
            for start in range(0, n_tokens, chunk_tokens):
                stop = min(start + chunk_tokens, n_tokens)
                rows = start + np.flatnonzero(keep[start:stop])
                if rows.size == 0:
                    continue
                chunk = acts[start:stop] if rows.size == stop - start else acts[rows]
                x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=param.device, dtype=param.dtype)
                if tiled:
                    data, indices, per_row = _tiled_codes(sae, x, kind, scale)  # type: ignore[arg-type]
                elif kind == "topk":
                    values, ids = _topk_parts(sae, encoder(x))
                    order = torch.argsort(ids, dim=1)  # CSR rows with sorted column indices
                    data = torch.gather(values, 1, order).float().cpu().numpy().reshape(-1)
                    indices = torch.gather(ids, 1, order).cpu().numpy().reshape(-1).astype(np.int32)
                    per_row = np.full(rows.size, values.shape[1], dtype=np.int64)
                elif kind == "jumprelu":  # relu(pre) * (pre > threshold), read straight off the mask
                    pre = encoder(x)
                    data, indices, indptr = _masked_to_csr(pre, (pre > sae.threshold) & (pre > 0))
                    per_row = np.diff(indptr)
                else:
                    z = sae.encode(x)
                    if z.is_sparse:
                        z = z.to_dense()
                    data, indices, indptr = _dense_to_csr(z)
                    per_row = np.diff(indptr)
                data_parts.append(data)
                index_parts.append(indices)
                counts[rows] = per_row
    finally:
        sae.train(was_training)
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    data = np.concatenate(data_parts) if data_parts else np.zeros(0, dtype=np.float32)
    indices = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int32)
    out = sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr), shape=(n_tokens, d_sae))
    out, n_clipped = _round_to_float16(out)  # also drops zeros (TopK ReLU, float16 underflow)
    if n_clipped:
        warnings.warn(f"{n_clipped} SAE code values exceeded the float16 range and were clipped to ±{_FLOAT16_MAX:g}", stacklevel=2)
    return out


@dataclass(frozen=True)
class EncodeStats:
    """Quality of an SAE on a dataset, over real tokens only."""

    n_tokens: int
    d_sae: int
    mean_l0: float  # active latents per real token
    dead_fraction: float  # latents never active on any real token
    explained_variance: float  # 1 - SSE / total variance of the activations (sae-lens definition)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n_tokens": self.n_tokens,
            "d_sae": self.d_sae,
            "mean_l0": self.mean_l0,
            "dead_fraction": self.dead_fraction,
            "explained_variance": self.explained_variance,
        }


def _sparse_decode(sae: SAE[Any], block: sp.csr_matrix) -> np.ndarray | None:
    """``sae.decode`` of CSR codes as a sparse x dense product (no dense [rows, d_sae] codes), float64;
    None where sae-lens's decode does more than codes @ W_dec + b_dec (hooks, run-time norms, reshapes)."""
    import torch

    w = sae.W_dec
    if (w.device.type != "cpu" or w.dtype != torch.float32 or _fast_kind(sae) is None
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
    JumpReLU SAEs as sparse codes x decoder (never a dense [tokens, d_sae] block), others with
    ``sae.decode``; sums run in float64 so large datasets do not lose precision.
    """
    import torch

    acts = np.asarray(acts)
    _check_acts(sae, acts, real_mask)
    if codes is None:
        codes = encode_sparse(sae, acts, chunk_tokens=chunk_tokens, real_mask=real_mask)
    codes = sp.csr_matrix(codes)
    if codes.shape != (acts.shape[0], int(sae.cfg.d_sae)):
        raise SaeCodesError(f"codes shape {codes.shape} does not match acts rows {acts.shape[0]} x sae d_sae {int(sae.cfg.d_sae)}")
    d_sae = int(sae.cfg.d_sae)
    chunk_tokens = _auto_chunk(chunk_tokens, d_sae if _fast_kind(sae) is None else 1)  # sparse decode: no dense block
    param = sae.W_dec
    active = np.zeros(d_sae, dtype=bool)
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
        return EncodeStats(n_tokens=0, d_sae=d_sae, mean_l0=0.0, dead_fraction=1.0, explained_variance=float("nan"))
    total_var = sum_sq - float((sum_x**2).sum()) / n
    ev = 1.0 - sse / total_var if total_var > 0 else float("nan")
    return EncodeStats(
        n_tokens=n,
        d_sae=d_sae,
        mean_l0=nnz / n,
        dead_fraction=float(1.0 - active.mean()),
        explained_variance=float(ev),
    )


# --------------------------------------------------------------------------------------------
# Sparse codes on disk
# --------------------------------------------------------------------------------------------


class SparseCodes(NamedTuple):
    """Codes of a dataset: token rows grouped by text via ``offsets``."""

    codes: sp.csr_matrix  # float32 [n_tokens, d_sae] (float16 on disk when lossless)
    offsets: np.ndarray  # int64 [n_texts + 1]; text i owns rows offsets[i]:offsets[i+1]
    real_mask: np.ndarray  # bool [n_tokens]
    rows: np.ndarray  # [n_texts] source row ids of the texts


_CODE_KEYS = ("format_version", "shape", "data", "data_dtype", "indices", "indptr", "offsets", "real_mask", "rows")


def _validate_codes(codes: sp.csr_matrix, offsets: np.ndarray, real_mask: np.ndarray, rows: np.ndarray) -> None:
    n_tokens = codes.shape[0]
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise SaeCodesError(f"offsets must be a 1-D integer array of n_texts+1 entries, got dtype {offsets.dtype} shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise SaeCodesError(f"offsets must start at 0, never decrease and end at n_tokens={n_tokens} (ends at {int(offsets[-1])})")
    if real_mask.shape != (n_tokens,) or real_mask.dtype != np.bool_:
        raise SaeCodesError(f"real_mask must be bool with one entry per token ({n_tokens}), got {real_mask.dtype} {real_mask.shape}")
    if rows.shape != (offsets.size - 1,) or rows.dtype == object:
        raise SaeCodesError(f"rows must be a non-object 1-D array with one entry per text ({offsets.size - 1}), got {rows.dtype} {rows.shape}")


def save_codes(
    path: str | Path,
    codes: sp.spmatrix | sp.sparray,
    offsets: np.ndarray,
    real_mask: np.ndarray,
    rows: np.ndarray,
) -> Path:
    """Write codes + token/text bookkeeping as one ``.npz`` (plain arrays, no pickle), atomically.

    Values are stored as float16 when that is lossless (always, for ``encode_sparse`` output),
    otherwise in their own dtype, so ``load_codes`` returns exactly what was saved.
    """
    csr = sp.csr_matrix(codes)
    if csr.dtype == np.float16:  # scipy cannot work on float16 sparse matrices; widen (exact)
        csr = sp.csr_matrix((csr.data.astype(np.float32), csr.indices, csr.indptr), shape=csr.shape)
    else:
        csr = csr.copy()
    csr.sort_indices()
    data = csr.data
    if data.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            as16 = data.astype(np.float16)
        if np.array_equal(as16.astype(data.dtype), data):
            data = as16
    offsets = np.asarray(offsets)
    real_mask = np.asarray(real_mask)
    rows = np.asarray(rows)
    _validate_codes(csr, offsets, real_mask, rows)
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(
                fh,
                format_version=np.array([CODES_FORMAT_VERSION], dtype=np.int64),
                shape=np.array(csr.shape, dtype=np.int64),
                data=data,
                data_dtype=np.array(str(csr.dtype)),
                indices=csr.indices,
                indptr=csr.indptr,
                offsets=offsets.astype(np.int64, copy=False),
                real_mask=real_mask,
                rows=rows,
            )
            fh.flush()
            os.fsync(fh.fileno())
    return target


def load_codes(path: str | Path) -> SparseCodes:
    """Read what ``save_codes`` wrote; raises ``CacheError`` if the file is unreadable or incomplete."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _CODE_KEYS if k not in z.files]
            if missing:
                raise CacheError(f"codes file {p} lacks {missing}; delete it so it is recomputed")
            version = int(z["format_version"][0])
            if version != CODES_FORMAT_VERSION:
                raise CacheError(f"codes file {p} has format {version}, expected {CODES_FORMAT_VERSION}; delete it so it is recomputed")
            shape = tuple(int(s) for s in z["shape"])
            data = z["data"].astype(str(z["data_dtype"]), copy=False)  # float16 on disk -> saved dtype
            codes = sp.csr_matrix((data, z["indices"], z["indptr"]), shape=shape)
            out = SparseCodes(codes=codes, offsets=z["offsets"], real_mask=z["real_mask"], rows=z["rows"])
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CacheError(f"codes file {p} is unreadable ({type(err).__name__}); delete it so it is recomputed") from err
    return out
