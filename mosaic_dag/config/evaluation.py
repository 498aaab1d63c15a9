"""Config of the checks beside the probes: SAE quality floors, the LM judge, interventions."""

from __future__ import annotations

from pydantic import Field, model_validator

from mosaic_dag.config.base import _Strict


class SaeQualityConfig(_Strict):
    """Floors every SAE must meet on each dataset partition (the blocking ``sae_quality`` check); null: off."""

    enabled: bool = True
    texts: int = Field(64, ge=1)  # train+validation texts the loss-recovered forward passes run over
    min_explained_variance: float | None = 0.5
    max_dead_fraction: float | None = Field(None, ge=0, le=1)
    min_loss_recovered: float | None = 0.5
    min_l0: float | None = None
    max_l0: float | None = None


class JudgeConfig(_Strict):
    """The language model itself as a zero-/k-shot classifier: a fourth baseline on the same test rows.

    Each class is an answer option (``options``: label name -> option text, with its leading space);
    the judge picks the option with the highest summed log-probability after the prompt, as the
    behaviour labels do. ``shots`` in-context examples come from the TRAIN split only."""

    enabled: bool = False
    model: str | None = None  # a model name from `models`; None: each target's own model
    template: str = "Text: {text}\nLabel:"
    options: dict[str, str] | None = None
    shots: int = Field(0, ge=0, le=64)
    datasets: list[str] | None = None  # dataset names; None: every text dataset
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8, le=32768)

    @model_validator(mode="after")
    def _judge(self) -> "JudgeConfig":
        if "{text}" not in self.template:
            raise ValueError("template must contain {text}")
        if self.enabled and not (self.options and len(self.options) >= 2):
            raise ValueError("enabled judge needs 'options' (label name -> answer text) for 2 or more classes")
        if self.options and len(set(self.options.values())) != len(self.options):
            raise ValueError("options: every class needs its own answer text")
        if self.options and any(not v.strip() for v in self.options.values()):
            raise ValueError("options: an answer text is empty")
        return self


class InterventionsConfig(_Strict):
    """Do the selected SAE probe's top latents matter to the probe and to the model (opt-in)?"""

    enabled: bool = False
    top: int = Field(3, ge=1, le=50)  # latents per class, by the probe's weight
    scale: float = 0.0  # the latent's code is multiplied by this during the forward (0: removed)
    texts: int = Field(32, ge=1)  # test texts the model-reliance forwards run over
    min_flip_share: float = Field(0.01, ge=0, le=1)  # a latent "drives the probe" from this share of flips
    min_effect: float = Field(0.01, ge=0)  # ... "drives the model" from this KL / |delta log-prob| (nats)
    batch_size: int = Field(8, ge=1)
