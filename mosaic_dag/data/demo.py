"""A small bundled demo dataset: toxic vs non-toxic messages in English, French, German and Spanish.

This is DEMO DATA written by mosaic itself from templates (no real users' messages), so the default
experiment runs offline. It is mild on purpose (insults, no slurs) and far easier than real data:
use it to see the pipeline work, not to draw conclusions.
"""

from __future__ import annotations

import json
import random
from importlib import resources as importlib_resources

import pandas as pd

LABEL_NAMES = {0: "non_toxic", 1: "toxic"}

# the templates and slot words per language (package data: mosaic_dag/configs/demo_templates.json)
_LEX: dict[str, dict[str, list[str]]] = json.loads(
    importlib_resources.files("mosaic_dag.configs").joinpath("demo_templates.json").read_text(encoding="utf-8"))

DEMO_LANGUAGES = tuple(_LEX)


def demo_dataset(rows_per_class: int = 60, seed: int = 0) -> pd.DataFrame:
    """Deterministic demo rows: columns text, label, language (no split: mosaic makes one)."""
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    for language, lex in _LEX.items():
        for label, kind in ((1, "toxic"), (0, "non_toxic")):
            seen: set[str] = set()
            attempts = 0
            while len(seen) < rows_per_class and attempts < rows_per_class * 50:
                attempts += 1
                template = rng.choice(lex[kind])
                slots = {k: rng.choice(v) for k, v in lex.items() if k not in ("toxic", "non_toxic")}
                text = template.format(**slots)
                if text not in seen:
                    seen.add(text)
                    records.append({"text": text, "label": label, "language": language})
    return pd.DataFrame.from_records(records)
