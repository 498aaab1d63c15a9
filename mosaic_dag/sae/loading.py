"""Load an inference SAE with sae-lens: from the registry (Hugging Face cache, offline too) or a local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mosaic_dag.sae.integrity import verify_checksums
from mosaic_dag.sae.registry import parse_layer, parse_site
from mosaic_dag.sae.spec import SaeLoadError, SaeSpec

if TYPE_CHECKING:  # sae-lens pulls in torch and transformer-lens; import it only when used
    import torch
    from sae_lens import SAE

__all__ = ["load_sae"]


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
            "check the spelling, upgrade sae-lens, or use origin: local / train"
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
                f"({_hf_cache_dir()}); use sae origin: train, or origin: local with a folder saved by sae-lens"
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
                spec = SaeSpec(origin="registry", release=release, sae_id=sae_id)
            elif path is not None:
                spec = SaeSpec(origin="local", path=str(path))
            else:
                raise SaeLoadError("load_sae needs a spec, release + sae_id, or path")
        elif not isinstance(spec, SaeSpec):
            spec = SaeSpec.model_validate(spec, from_attributes=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "sae"
        raise SaeLoadError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None

    if spec.origin == "registry":
        assert spec.release is not None and spec.sae_id is not None  # validated by SaeSpec
        return _load_registry_sae(spec.release, spec.sae_id, device, dtype)

    if not spec.path:
        raise SaeLoadError(f"sae {spec.name!r} (origin: {spec.origin}) has no path yet; train it with train_sae first")
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

