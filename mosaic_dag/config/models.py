"""Config of the language models and the SAEs read at each of their layers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mosaic_dag.config.base import _check_key, _Strict
from mosaic_dag.sae.spec import check_origin, default_sae_name  # no torch: spec imports pydantic only

BUNDLED_MODEL = "bundled:gemma-3-270m"


class SaeConfig(_Strict):
    """Where an SAE comes from: sae-lens registry, a local sae-lens folder, or trained here."""

    origin: Literal["registry", "local", "train"] = "train"
    name: str | None = None
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    architecture: Literal["batchtopk", "jumprelu", "topk", "standard"] = "batchtopk"
    width: int = Field(4096, ge=16)
    k: int = Field(32, ge=1)
    training_tokens: int = Field(200_000, ge=1_000)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(1024, ge=16)
    seed: int = 0
    train_on: list[str] | None = None  # train: dataset names or <dataset>.<language> keys (default: all)

    @model_validator(mode="before")
    @classmethod
    def _renamed_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" in data:  # the key's name before issue 15
            raise ValueError("'source' is now 'origin' (registry|local|train); rename the key")
        return data

    @model_validator(mode="after")
    def _origin_fields(self) -> "SaeConfig":
        check_origin(self.origin, self.release, self.sae_id, self.path)
        if self.name is not None:
            _check_key(self.name, "name")
        return self

    @property
    def label(self) -> str:
        """Short name used in partition keys (e.g. gs2-16k-medium, local-btk4k)."""
        if self.name:
            return self.name
        return default_sae_name(self.origin, self.release, self.sae_id, self.path, self.architecture, self.width)


class ModelConfig(_Strict):
    """A language model and the layers whose residual stream we capture."""

    name: str
    id: str = BUNDLED_MODEL
    revision: str | None = None
    layers: list[int] = Field(min_length=1)
    saes: list[SaeConfig] = Field(default_factory=lambda: [SaeConfig()], min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where native, else fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = Field(128, ge=2, le=32768)
    batch_tokens: int | None = Field(None, ge=64)  # None: 2048 on CPU, 8192 on GPU (models.default_batch_tokens)
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_key(v, "name")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(layer < 0 for layer in v):
            raise ValueError("layers must be >= 0 (block index, 0-based)")
        if len(set(v)) != len(v):
            raise ValueError("layers must not repeat")
        return sorted(v)
