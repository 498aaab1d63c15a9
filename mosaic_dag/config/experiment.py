"""The whole experiment: every section, cross-section checks, and path resolution."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr, model_validator

from mosaic_dag.config.base import _Strict
from mosaic_dag.config.classification import ClassificationConfig, ConditionsConfig, TransferConfig
from mosaic_dag.config.datasets import IMAGE_LANGUAGE, DatasetConfig, SplitConfig
from mosaic_dag.config.evaluation import InterventionsConfig, JudgeConfig, SaeQualityConfig
from mosaic_dag.config.models import ModelConfig
from mosaic_dag.errors import ConfigError


class MlflowConfig(_Strict):
    tracking_uri: str | None = None
    experiment: str = "mosaic"
    ui_url: str = "http://127.0.0.1:5000"  # where `mlflow ui` serves: the Dagster metadata links point here
    dagster_url: str = "http://127.0.0.1:3000"  # where `dagster dev` / `mosaic ui` serves: MLflow runs link here
    log_sae_weights: bool = False  # also log each SAE's weights as an MLflow artifact (can be large)


class RunConfig(_Strict):
    """How ``mosaic run`` executes the graph."""

    workers: int = Field(1, ge=1, le=64)  # independent partitions run in this many processes at once


class ExperimentConfig(_Strict):
    """The whole experiment, as read from one YAML file."""

    name: str = "experiment"
    data_dir: str = "mosaic_data"
    models: list[ModelConfig] = Field(min_length=1)
    datasets: list[DatasetConfig] = Field(min_length=1)
    split: SplitConfig = SplitConfig()
    classification: ClassificationConfig = ClassificationConfig()
    transfer: TransferConfig = TransferConfig()
    conditions: ConditionsConfig = ConditionsConfig()
    sae_quality: SaeQualityConfig = SaeQualityConfig()
    judge: JudgeConfig = JudgeConfig()
    interventions: InterventionsConfig = InterventionsConfig()
    mlflow: MlflowConfig = MlflowConfig()
    run: RunConfig = RunConfig()
    _base_dir: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths resolve against: the config file's folder, else the cwd."""
        return self._base_dir or Path.cwd()

    @model_validator(mode="after")
    def _unique(self) -> "ExperimentConfig":
        for kind, names in (("models", [m.name for m in self.models]), ("datasets", [d.name for d in self.datasets])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{kind} names must be unique; repeated: {sorted(dup)}")
        keys = {f"{d.name}.{lang}" for d in self.datasets for lang in self.dataset_languages(d.name)}
        names = {d.name for d in self.datasets}
        for m in self.models:
            labels = [s.label for s in m.saes]
            if len(set(labels)) != len(labels):
                raise ValueError(f"models[{m.name}].saes names must be unique; set 'name' on each")
            for sae in m.saes:
                unknown = [k for k in sae.train_on or [] if k not in keys and k not in names]
                if unknown:
                    raise ValueError(f"models[{m.name}].saes[{sae.label}].train_on: {unknown} are not datasets or "
                                     f"dataset partitions of this config; use names from {sorted(names | keys)}")
        cls = self.classification
        if "ksparse" in cls.classifiers:
            for m in self.models:
                for sae in m.saes:
                    too_big = [k for k in cls.k if sae.origin == "train" and k > sae.width]
                    if too_big:
                        raise ValueError(
                            f"classification.k: {too_big} larger than the width {sae.width} of SAE {sae.label!r} "
                            f"(models[{m.name}]); use k <= {sae.width}"
                        )
        for task, members in self.tasks.items():
            if len(members) < 2:
                raise ValueError(f"datasets: task {task!r} has one dataset ({members[0]}); give 'task: {task}' to "
                                 "a second dataset or drop it")
            common = {d: sorted(set(self.dataset(d).task_classes.values())) for d in members}  # type: ignore[union-attr]
            if len({tuple(v) for v in common.values()}) > 1:
                raise ValueError(f"datasets: task {task!r} maps onto different common classes ({common}); "
                                 "use the same class names in every task_classes")
        jc = self.judge
        if jc.model is not None and jc.model not in {m.name for m in self.models}:
            raise ValueError(f"judge.model: {jc.model!r} is not a model name of this config; use one of "
                             f"{[m.name for m in self.models]}")
        unknown = [d for d in jc.datasets or [] if d not in names]
        if unknown:
            raise ValueError(f"judge.datasets: {unknown} are not datasets of this config; use names from {sorted(names)}")
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"model {name!r} is not in the config; known: {[m.name for m in self.models]}")

    def dataset(self, name: str) -> DatasetConfig:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"dataset {name!r} is not in the config; known: {[d.name for d in self.datasets]}")

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Task name -> the datasets that declare it (config order)."""
        out: dict[str, list[str]] = {}
        for d in self.datasets:
            if d.task is not None:
                out.setdefault(d.task, []).append(d.name)
        return out

    def dataset_languages(self, name: str) -> list[str]:
        d = self.dataset(name)
        if d.modality == "image":
            return [IMAGE_LANGUAGE] + d.description_languages
        if d.paths:
            return list(d.paths)
        if d.language_field is not None:
            return list(d.languages or [])
        return [str(d.language)]

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def data_path(self) -> Path:
        return self.resolve(self.data_dir)
