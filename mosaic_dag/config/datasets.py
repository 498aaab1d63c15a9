"""Config of the labelled datasets (text, images, behaviour labels) and the split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mosaic_dag.config.base import _check_key, _Strict


class BehaviourConfig(_Strict):
    """Labels from what a behaviour model does with each text (the seed paper's cross-model setting)."""

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
