"""Where an SAE comes from (registry | local | train), its short name, and the SAE errors.

No torch and no sae-lens import here: the config validates SAE origins with ``check_origin`` and
names SAEs with ``default_sae_name`` without pulling in either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from mosaic_dag.errors import MosaicError

__all__ = ["Origin", "SaeCodesError", "SaeLoadError", "SaeMismatchError", "SaeSpec", "check_origin", "default_sae_name"]


class SaeMismatchError(MosaicError, ValueError):
    """The SAE does not fit the model/layer it is paired with (d_in, layer, model or hook site)."""


class SaeLoadError(MosaicError, ValueError):
    """The SAE cannot be loaded (unknown release/id, missing folder, offline and not cached)."""


class SaeCodesError(MosaicError, ValueError):
    """Arrays handed to ``write_codes`` / ``encode_sparse`` are inconsistent with each other."""


Origin = Literal["registry", "local", "train"]


def check_origin(origin: str, release: str | None, sae_id: str | None, path: str | None) -> None:
    """Raise ``ValueError`` when the fields an origin needs are missing (shared by the config and ``SaeSpec``)."""
    if origin == "registry" and not (release and sae_id):
        raise ValueError("sae origin 'registry' needs both 'release' and 'sae_id' (see sae-lens pretrained_saes.yaml)")
    if origin == "local" and not path:
        raise ValueError("sae origin 'local' needs 'path' (a folder written by sae-lens save_model)")


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
    origin: str,
    release: str | None = None,
    sae_id: str | None = None,
    path: str | None = None,
    architecture: str | None = None,
    width: int | None = None,
) -> str:
    """Short label for partition keys: ``gs2-16k-medium``, ``local-btk4k``, ``local-<folder>``.

    The layer is left out on purpose: it is its own partition dimension in mosaic.
    """
    if origin == "registry":
        rel, sid = release or "", sae_id or ""
        m_rel = re.fullmatch(r"gemma-scope-2-[\d.]+[mb]-(pt|it)-res(-all)?", rel)
        m_id = re.fullmatch(r"layer_\d+_width_([0-9]+[kmKM]?)_l0_(\w+)", sid)
        if m_rel and m_id:
            prefix = "gs2" + ("-it" if m_rel.group(1) == "it" else "") + ("-all" if m_rel.group(2) else "")
            return _slug(f"{prefix}-{m_id.group(1)}-{m_id.group(2)}".replace("_", "-"))
        return _slug(f"{rel}-{sid}")
    if origin == "train" and architecture:
        arch = _ARCH_ABBREV.get(architecture, architecture)
        return _slug(f"local-{arch}{_short_width(width) if width else ''}")
    if path:
        return _slug(f"local-{Path(path).name}")
    return "local"


class SaeSpec(BaseModel):
    """Where an SAE comes from. ``SaeSpec.model_validate(cfg, from_attributes=True)`` accepts config objects."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    origin: Origin
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
        check_origin(self.origin, self.release, self.sae_id, self.path)
        if not self.name:
            name = default_sae_name(self.origin, self.release, self.sae_id, self.path, self.architecture, self.width)
            object.__setattr__(self, "name", name)  # frozen model: fill the derived default once
        return self


