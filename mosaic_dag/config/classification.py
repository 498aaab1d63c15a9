"""Config of the probe sweep, cross-lingual transfer and the hard conditions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mosaic_dag.config.base import PositiveInt, Pooling, _Strict

Threshold = Annotated[float, Field(ge=0)]  # codes are >= 0 (|codes| for signed SAEs): below 0 switches every latent on


class ClassificationConfig(_Strict):
    poolings: list[Pooling] = Field(["mean", "max", "topn_count"], min_length=1)
    thresholds: list[Threshold | None] = Field([None, 0.0, 1.0], min_length=1)
    top_n: list[PositiveInt] = Field([20], min_length=1)
    classifiers: list[Literal["logistic", "tree", "ksparse"]] = Field(["logistic", "tree", "ksparse"], min_length=1)
    k: list[PositiveInt] = [1, 5, 20, 100]
    tfidf: list[Literal["word", "char"]] = ["word", "char"]
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _k_for_ksparse(self) -> "ClassificationConfig":
        if "ksparse" in self.classifiers and not self.k:
            raise ValueError("classifier 'ksparse' needs at least one k (latents to keep)")
        return self


class TransferConfig(_Strict):
    """Cross-lingual transfer: train on each language, test on every language of a dataset."""

    enabled: bool = True
    pooling: Pooling = "mean"
    top_n: PositiveInt = 20
    threshold: Threshold | None = None
    tfidf: Literal["word", "char"] = "word"


class ConditionsConfig(_Strict):
    """Hard conditions (SAE-Probes style): train-size sweep, class imbalance, label noise."""

    enabled: bool = False
    sizes: list[Annotated[int, Field(ge=2)] | None] = [16, 64, 256, 1024, None]
    imbalances: list[Annotated[float, Field(gt=0, le=0.5)]] = [0.5, 0.2, 0.1, 0.05]
    noise_rates: list[Annotated[float, Field(ge=0, lt=1)]] = [0.0, 0.1, 0.2, 0.3]
    pooling: Pooling = "mean"
    top_n: PositiveInt = 20
