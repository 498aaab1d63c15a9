"""Experiment config: one YAML file, validated before any compute.

The shape follows the seed tool's config.yaml (``models`` / ``datasets`` / ``classification``)
so its users feel at home. Every error is a single line naming the key path and what is allowed.
"""

from __future__ import annotations

import re
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mosaic_dag.errors import ConfigError
from mosaic_dag.sae.spec import check_origin, default_sae_name  # no torch: spec imports pydantic only

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
BUNDLED_MODEL = "bundled:gemma-3-270m"


class _Strict(BaseModel):
    # strict: `layers: [true]` is not layer 1 and `bootstrap: yes` is not 1 resample; no NaN/inf anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]


def _check_key(value: str, field: str) -> str:
    if not _KEY_RE.match(value):
        raise ValueError(
            f"{field} {value!r} may hold only letters, digits, '_' and '-' (it becomes a partition key)"
        )
    return value


class SaeConfig(_Strict):
    """Where an SAE comes from: sae-lens registry, a local sae-lens folder, or trained here."""

    source: Literal["registry", "local", "train"] = "train"
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

    @model_validator(mode="after")
    def _source_fields(self) -> "SaeConfig":
        check_origin(self.source, self.release, self.sae_id, self.path)
        if self.name is not None:
            _check_key(self.name, "name")
        return self

    @property
    def label(self) -> str:
        """Short name used in partition keys (e.g. gs2-16k-medium, local-btk4k)."""
        if self.name:
            return self.name
        return default_sae_name(self.source, self.release, self.sae_id, self.path, self.architecture, self.width)


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


class BehaviourConfig(_Strict):
    """Labels from a TARGET model's behaviour on each text (the seed paper's cross-model setting)."""

    model: str  # a model name from `models`, or any model id / local folder / bundled:gemma-3-270m
    task: Literal["generate", "choice"] = "generate"
    prompt_template: str = "{text}"
    options: list[str] | None = None  # choice: the answer options (with their leading space)
    answer_field: str | None = None  # choice: column holding the gold answer
    answer_map: dict[str, int] | None = None  # choice: gold value (as text) -> option index
    judge: Literal["keyword", "model"] = "keyword"  # generate: how a reply becomes refusal/compliance
    judge_model: str | None = None
    refusal_patterns: list[str] | None = None
    chat: bool = True
    max_new_tokens: int = Field(48, ge=1, le=1024)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _task(self) -> "BehaviourConfig":
        if self.task == "choice" and not (self.options and len(self.options) >= 2 and self.answer_field):
            raise ValueError("task 'choice' needs 'options' (2 or more) and 'answer_field'")
        if "{text}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {text}")
        if self.judge == "model" and not self.judge_model:
            raise ValueError("judge 'model' needs 'judge_model'")
        return self


class DescriptionsConfig(_Strict):
    """Text rows written from templates, one per (template, class): the text side of text -> image transfer."""

    language: str = "en"  # partition key of the text rows (next to 'image')
    names: dict[str, str] | None = None  # label_name -> the class as written in this language ({seven: sept})
    templates: list[str] = Field(default_factory=lambda: [
        "a picture of a {label_name}", "an image of a {label_name}", "a photo of the {label_name}",
        "a drawing of a {label_name}", "this is a {label_name}", "a {label_name}", "the {label_name}",
        "an example of a {label_name}",
    ], min_length=4)

    @model_validator(mode="after")
    def _templates(self) -> "DescriptionsConfig":
        _check_key(self.language, "language")
        if self.language == "image":
            raise ValueError("language 'image' is the image partition's key; pick another (e.g. en)")
        bad = [t for t in self.templates if "{label_name}" not in t]
        if bad:
            raise ValueError(f"templates must contain {{label_name}}; {bad[0]!r} does not")
        if len(set(self.templates)) != len(self.templates):
            raise ValueError("templates must not repeat")
        return self


IMAGE_LANGUAGE = "image"  # the partition key of an image dataset's image rows: <dataset>.image


class DatasetConfig(_Strict):
    """A labelled dataset: Hugging Face hub, local file(s), a bundled set; text or images."""

    name: str
    path: str | None = None
    paths: dict[str, str] | None = None  # one local file/folder per language: {en: ..., fr: ...}
    hf_name: str | None = None
    config_name: str | None = None
    split: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    language: str | None = "en"
    label_names: dict[int, str] | None = None
    language_field: str | None = None
    languages: list[str] | None = None
    split_field: str | None = None
    max_rows: int | None = Field(None, ge=2)
    max_per_class: int | None = Field(None, ge=1)  # at most this many rows of each class (per source split), seeded: balances a skewed source
    label_from: Literal["field", "file"] = "field"  # file: a folder's file names say the class (harmful_train.json)
    behaviour: BehaviourConfig | None = None
    # transfer across datasets: datasets naming one task get a train-dataset x test-dataset matrix,
    # their labels mapped onto the task's common classes (label name -> common class)
    task: str | None = None
    task_classes: dict[str, str] | None = None
    # images (mosaic_dag.data.images): bundled:digits, a folder with one sub-folder per class, or a table whose
    # image_field holds a path or the image bytes; the prompt and the tokens that count (mosaic_dag.lm.vlm)
    modality: Literal["text", "image"] = "text"
    image_field: str = "image"
    prompt_template: str = "{image}"
    tokens: Literal["image", "text", "all"] | None = None  # None: image for images, text for texts
    descriptions: list[DescriptionsConfig] | None = None  # one mapping or a list (one per language)

    @model_validator(mode="before")
    @classmethod
    def _bundled_images(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") == "bundled:digits" and "modality" not in data:
            data = {**data, "modality": "image"}
        if isinstance(data, dict) and isinstance(data.get("descriptions"), dict):
            data = {**data, "descriptions": [data["descriptions"]]}
        return data

    @property
    def description_languages(self) -> list[str]:
        return [d.language for d in self.descriptions or []]

    def description(self, language: str) -> DescriptionsConfig | None:
        return next((d for d in self.descriptions or [] if d.language == language), None)
    allow_shared_texts: bool = False  # a text in two splits (train and test) is leakage: refused unless set
    drop_shared_texts: bool = False  # … or keep only its test (else validation) copy

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_key(v, "name")

    @property
    def token_selection(self) -> str:
        """Which tokens of each row reach the cache as real: image, text or all."""
        return self.tokens or ("image" if self.modality == "image" else "text")

    @model_validator(mode="after")
    def _label_from_file(self) -> "DatasetConfig":
        if self.label_from == "file" and self.path is None and self.paths is None:
            raise ValueError("label_from 'file' reads class names from a local folder's file names; set path (or paths)")
        return self

    @model_validator(mode="after")
    def _images(self) -> "DatasetConfig":
        if self.modality == "text":
            if self.tokens not in (None, "text"):
                raise ValueError(f"tokens {self.tokens!r} needs modality 'image'; a text dataset has only text tokens")
            if self.descriptions is not None:
                raise ValueError("descriptions needs modality 'image' (they are the text side of an image dataset)")
            for key in ("prompt_template", "image_field"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key} needs modality 'image'; set modality: image or drop it")
            return self
        if self.paths or self.language_field or self.behaviour is not None:
            raise ValueError("modality 'image' takes one 'path' or 'hf_name'; 'paths', 'language_field' and "
                             "'behaviour' are for text datasets")
        if "language" in self.model_fields_set:
            raise ValueError("an image dataset's partitions are 'image' and descriptions.language; drop 'language'")
        langs = self.description_languages
        if len(set(langs)) != len(langs):
            raise ValueError(f"descriptions languages must be unique; got {langs}")
        if "{image}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {image} (where the image tokens go)")
        return self

    @model_validator(mode="after")
    def _task(self) -> "DatasetConfig":
        if (self.task is None) != (self.task_classes is None):
            raise ValueError("give 'task' and 'task_classes' (label name -> the task's common class) together")
        if self.task is not None:
            _check_key(self.task, "task")
            if self.modality != "text":
                raise ValueError("'task' is for text datasets")
            if len(set(self.task_classes.values())) < 2:  # type: ignore[union-attr]
                raise ValueError("task_classes must map onto 2 or more common classes")
        return self

    @model_validator(mode="after")
    def _source(self) -> "DatasetConfig":
        if sum(bool(x) for x in (self.path, self.paths, self.hf_name)) > 1:
            raise ValueError("give one of 'path', 'paths' or 'hf_name'")
        if not (self.path or self.paths or self.hf_name):
            raise ValueError("give 'path' (local file, folder or 'bundled:demo'), 'paths' (one per language) or 'hf_name'")
        for lang in self.paths or {}:
            _check_key(lang, "paths key")
        if self.paths:
            return self
        if self.language_field is None and self.language is None:
            raise ValueError("give 'language' (one code for all rows) or 'language_field' (a column)")
        if self.language_field is not None and not self.languages:
            raise ValueError("with 'language_field' also list 'languages' (they become partitions)")
        for lang in self.languages or []:
            _check_key(lang, "languages entry")
        if self.language is not None:
            _check_key(self.language, "language")
        return self


class SplitConfig(_Strict):
    """Seeded stratified split used when a source has no split of its own."""

    validation: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.25, gt=0, lt=0.5)
    seed: int = 0

    @model_validator(mode="after")
    def _train_keeps_the_larger_share(self) -> "SplitConfig":
        train = 1 - self.validation - self.test
        if train < self.validation:
            raise ValueError(
                f"validation {self.validation:g} + test {self.test:g} leave {train:.0%} of the rows for train, "
                f"less than validation's {self.validation:.0%}; lower them so train keeps the largest share"
            )
        return self


Threshold = Annotated[float, Field(ge=0)]  # codes are >= 0 (|codes| for signed SAEs): below 0 switches every latent on


class ClassificationConfig(_Strict):
    poolings: list[Literal["sum", "mean", "max", "last", "topn_count"]] = Field(["mean", "max", "topn_count"], min_length=1)
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
    pooling: Literal["sum", "mean", "max", "last", "topn_count"] = "mean"
    top_n: PositiveInt = 20
    threshold: Threshold | None = None
    tfidf: Literal["word", "char"] = "word"


class ConditionsConfig(_Strict):
    """Hard conditions (SAE-Probes style): train-size sweep, class imbalance, label noise."""

    enabled: bool = False
    sizes: list[Annotated[int, Field(ge=2)] | None] = [16, 64, 256, 1024, None]
    imbalances: list[Annotated[float, Field(gt=0, le=0.5)]] = [0.5, 0.2, 0.1, 0.05]
    noise_rates: list[Annotated[float, Field(ge=0, lt=1)]] = [0.0, 0.1, 0.2, 0.3]
    pooling: Literal["sum", "mean", "max", "last", "topn_count"] = "mean"
    top_n: PositiveInt = 20


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
                    too_big = [k for k in cls.k if sae.source == "train" and k > sae.width]
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


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key; check the spelling against README's config reference"
    elif kind == "literal_error":
        msg = msg.replace("Input should be", "allowed:")
    elif kind == "missing":
        msg = "required key is missing"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping; raise ConfigError with one line naming the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'models' and 'datasets'")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read a YAML config; ``None`` means the embedded demo config."""
    if path is None:
        text = importlib_resources.files("mosaic_dag.configs").joinpath("demo.yaml").read_text()
        return parse_config(yaml.safe_load(text), "demo.yaml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config with a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    cfg = parse_config(data, str(p))
    cfg._base_dir = p.resolve().parent
    return cfg


def config_text(path: str | Path | None) -> str:
    """The raw YAML, for hashing and for logging to MLflow."""
    if path is None:
        return importlib_resources.files("mosaic_dag.configs").joinpath("demo.yaml").read_text()
    return Path(path).read_text()
