"""Pure logic over sae-lens's pretrained-SAE registry (``pretrained_saes.yaml``).

No torch and no sae-lens import here: a Dagster sensor calls these functions on every tick, and
``sae.py`` reuses the name parsers (layer / hook site) so both sides agree on what an SAE is for.

Layer convention (fixed by the rest of mosaic): layer L means the residual stream AFTER block L,
i.e. the output of ``model.model.layers[L]`` in Hugging Face terms. A ``hook_resid_pre`` SAE at
block L therefore reads the same vector as our layer L-1.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "RegistryEntry",
    "Site",
    "matching_saes",
    "model_key",
    "models_match",
    "neuronpedia_id",
    "parse_layer",
    "parse_site",
    "read_registry",
    "registry_cursor",
    "registry_path",
    "resid_post_layer",
]

Site = Literal["resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out", "transcoder", "embedding"]

# The residual-stream sites whose vectors we can feed an SAE with (after shifting resid_pre by one).
_RESIDUAL_SITES: frozenset[str] = frozenset({"resid_post", "resid_pre"})

# Ordered: the first pattern that matches a string decides its layer.
_LAYER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"blocks\.(\d+)\."),  # TransformerLens: blocks.6.hook_resid_post
    re.compile(r"(?:^|[./_])layers\.(\d+)(?:\.|$)"),  # HF: model.layers.6 / model.layers.6.output
    re.compile(r"layer_?(\d+)", re.IGNORECASE),  # layer_6_width_16k, resid_post_layer_3, layer0
    re.compile(r"(?:^|[/_-])l(\d+)[ram]_", re.IGNORECASE),  # llama-scope ids: l12r_8x
    re.compile(r"(?:^|[/_-])L(\d+)(?:[_-]|$)"),  # ..._L6_...
)


def parse_layer(text: str | None) -> int | None:
    """Block index named in a hook name, HF module path, SAE id or registry path; None if absent."""
    if not text:
        return None
    for pattern in _LAYER_PATTERNS:
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    return None


def parse_site(*texts: str | None) -> Site | None:
    """Which activation an SAE reads, from any of its names (release, id, path, hook name).

    Returns None when the names do not say; callers treat that as "unknown", not as residual.
    """
    joined = " ".join(t for t in texts if t).lower()
    if not joined:
        return None
    if "transcoder" in joined or re.search(r"(^|[^a-z])clt([^a-z]|$)", joined) or "skip" in joined:
        return "transcoder"
    if "resid_pre" in joined or "resid-pre" in joined:
        return "resid_pre"
    if "resid_mid" in joined or "resid-mid" in joined:
        return "resid_mid"
    if "resid_post" in joined or "resid-post" in joined:
        return "resid_post"
    if "embedding" in joined or "hook_embed" in joined:
        return "embedding"
    if "mlp" in joined:
        return "mlp_out"
    if "attn" in joined or "hook_z" in joined or re.search(r"(^|[^a-z])att([^a-z]|$)", joined):
        return "attn_out"
    if re.search(r"(^|[^a-z])res([^a-z]|$)", joined):  # gemma-scope-2b-pt-res, gpt2-small-res-jb
        return "resid_post"
    if re.search(r"(^|[\s/_-])l\d+r_", joined):  # llama-scope residual SAEs
        return "resid_post"
    if re.search(r"model\.layers\.\d+(\.output)?$", joined):  # bare HF block output
        return "resid_post"
    return None


def resid_post_layer(site: Site | None, layer: int | None) -> int | None:
    """Translate a (site, block) pair to mosaic's layer index; None if it is not our residual stream."""
    if layer is None or site not in _RESIDUAL_SITES:
        return None
    if site == "resid_pre":
        return layer - 1 if layer >= 1 else None  # resid_pre of block 0 is the embeddings
    return layer


def model_key(name: str | None) -> str:
    """Loose model identity: ``google/gemma-3-270m``, ``gemma-3-270m`` and ``bundled:gemma-3-270m`` agree.

    Drops any ``org/`` or ``scheme:`` prefix, case, and a trailing ``-pt`` (sae-lens itself writes the
    270M base model with and without it). Instruction-tuned (``-it``) stays distinct.
    """
    if not name:
        return ""
    key = name.strip().lower().rstrip("/")
    key = re.split(r"[/:]", key)[-1]
    return key.removesuffix("-pt")


def models_match(a: str | None, b: str | None) -> bool:
    """True when both names are known and denote the same model (see ``model_key``)."""
    ka, kb = model_key(a), model_key(b)
    return bool(ka) and ka == kb


def registry_path() -> Path:
    """Location of the YAML file shipped inside the installed sae-lens package.

    Found via the import system's spec so sae-lens (and torch) are not imported just to read a file.
    """
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("sae-lens is not installed; pip install sae-lens, or pass the registry path explicitly")
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"


def read_registry(path: Path | None = None) -> dict[str, Any]:
    """Parse the registry YAML from disk on every call.

    sae-lens caches its own parse for the life of the process, so a sensor relying on it would never
    see a ``pip install -U sae-lens``; reading the file again is cheap (well under a second).
    """
    p = Path(path) if path is not None else registry_path()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(p, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=loader)  # noqa: S506 - SafeLoader / CSafeLoader only
    if not isinstance(data, dict):
        raise ValueError(f"sae registry {p} is not a mapping of releases; reinstall sae-lens or fix the file")
    return data


@dataclass(frozen=True)
class RegistryEntry:
    """One pretrained SAE that reads a configured model's residual stream at a configured layer."""

    release: str
    sae_id: str
    model: str  # the registry's model name, e.g. "google/gemma-3-270m"
    configured_model: str  # the name from our config that it matched
    layer: int  # mosaic convention: residual stream after block `layer`
    site: Site
    path: str
    repo_id: str
    neuronpedia_id: str | None = None


def _iter_saes(registry: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for release, info in registry.items():
        if not isinstance(info, dict):
            continue
        for sae in info.get("saes") or []:
            if isinstance(sae, dict) and "id" in sae:
                out.append((str(release), info, sae))
    return out


def matching_saes(
    registry: dict[str, Any],
    model_names: list[str],
    layers_by_model: dict[str, list[int]],
) -> list[RegistryEntry]:
    """Registry SAEs for our residual stream: model matches loosely, layer is configured.

    ``layers_by_model`` is keyed like ``model_names`` (loose keys are accepted too). SAEs whose site
    or layer cannot be read from their names are skipped rather than guessed. Sorted for stable output.
    """
    wanted: list[tuple[str, set[int]]] = []
    for name in model_names:
        layers = layers_by_model.get(name)
        if layers is None:
            layers = next((v for k, v in layers_by_model.items() if models_match(k, name)), [])
        wanted.append((name, {int(x) for x in layers}))

    found: list[RegistryEntry] = []
    for release, info, sae in _iter_saes(registry):
        reg_model = str(info.get("model", ""))
        targets = [(name, layers) for name, layers in wanted if models_match(reg_model, name)]
        if not targets:
            continue
        sae_id, path = str(sae["id"]), str(sae.get("path", sae["id"]))
        site = parse_site(release, sae_id, path)
        block = parse_layer(sae_id)
        if block is None:
            block = parse_layer(path)
        layer = resid_post_layer(site, block)
        if layer is None or site is None:
            continue
        for name, layers in targets:
            if layer in layers:
                found.append(
                    RegistryEntry(
                        release=release,
                        sae_id=sae_id,
                        model=reg_model,
                        configured_model=name,
                        layer=layer,
                        site=site,
                        path=path,
                        repo_id=str(info.get("repo_id", "")),
                        neuronpedia_id=sae.get("neuronpedia"),
                    )
                )
    found.sort(key=lambda e: (e.configured_model, e.layer, e.release, e.sae_id))
    return found


def registry_cursor(entries: list[RegistryEntry]) -> str:
    """Order-independent hash of the known (release, sae_id) pairs, for a sensor cursor."""
    pairs = sorted({(e.release, e.sae_id) for e in entries})
    blob = json.dumps(pairs, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def neuronpedia_id(release: str, sae_id: str, registry: dict[str, Any] | None = None) -> str | None:
    """Neuronpedia id of a registry SAE (e.g. ``gemma-3-270m/5-gemmascope-2-res-16k``), or None."""
    reg = registry if registry is not None else read_registry()
    info = reg.get(release)
    if not isinstance(info, dict):
        return None
    for sae in info.get("saes") or []:
        if isinstance(sae, dict) and str(sae.get("id")) == sae_id:
            value = sae.get("neuronpedia")
            return str(value) if value else None
    return None
