"""Property-based bad input (Hypothesis): random datasets and configs through `mosaic run`.

Each example writes a small dataset — random label types (ints, strings, fractions, booleans, ints as
text, missing), empty/whitespace/non-text/NaN texts, random split columns, texts shared between
splits, random file formats and CSV delimiters — and a config with random classification values
(NaN/inf/negative thresholds, k 0, booleans for integers, empty lists, layers out of range). For every
example: exit 0 with a results table, or exit 1 with exactly one ``mosaic: error:`` line that is not
a raw Python exception, and no temp file, unreadable parquet or invalid cache left in ``data_dir``.

The example count is bounded (``MOSAIC_FUZZ_EXAMPLES``, default 8) and the search derandomized, so
CI runs the same examples every time; raise the count locally to search further.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mosaic_dag.cli import main  # noqa: E402
from mosaic_dag.lm.extract import HiddenCache  # noqa: E402
from tests.support.models import WORDS
from tests.support.models import FAST_CLASSIFICATION, FAST_SAE, mlflow_store

EXAMPLES = int(os.environ.get("MOSAIC_FUZZ_EXAMPLES", "8"))
RAW_EXCEPTION = re.compile(r"^[A-Z][A-Za-z0-9_]*(Error|Exception|Warning)\b")

LABEL_POOLS = [[0, 1], ["pos", "neg"], [0, 1, 2], [0.5, 1.5], [0, "pos"], [True, False], [0, None],
               [1.0, 0.0], ["0", "1"], ["spam"], [0, float("nan")]]
SPLIT_POOLS = [["train", "test"], ["train", "validation", "test"], ["TRAIN", "Test", "dev"], ["train", "bogus"],
               ["train"], ["test"], ["train", None]]
WEIRD_TEXTS = st.one_of(st.just(""), st.just("   \t"), st.none(), st.integers(-3, 3), st.just(float("nan")),
                        st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20))
FORMATS = ["csv", "csv;", "csv\t", "csv|", "tsv", "jsonl", "json", "parquet"]
THRESHOLDS = st.lists(st.sampled_from([None, 0.0, 1.0, -1.0, float("nan"), float("inf")]), max_size=3)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[pd.DataFrame, str]:
    n = draw(st.integers(0, 36))
    words = draw(st.lists(st.sampled_from(WORDS), min_size=3, max_size=3))
    texts: list[object] = [f"{' '.join(words)} {WORDS[i % len(WORDS)]} number {i}" for i in range(n)]
    if draw(st.booleans()):  # dirty: some rows get odd texts
        for i in draw(st.lists(st.integers(0, max(0, n - 1)), max_size=4)) if n else []:
            texts[i] = draw(WEIRD_TEXTS)
    pool = draw(st.sampled_from(LABEL_POOLS)) if draw(st.booleans()) else [0, 1]
    labels = [pool[i % len(pool)] for i in range(n)]
    df = pd.DataFrame({"text": pd.Series(texts, dtype=object), "label": pd.Series(labels, dtype=object)})
    if draw(st.booleans()):
        splits = draw(st.sampled_from(SPLIT_POOLS))
        df["split"] = [splits[(i // 2) % len(splits)] for i in range(n)]
        if n >= 4 and draw(st.booleans()):  # the same text in two splits
            df.loc[df.index[-1], "text"] = df["text"].iloc[0]
    return df, draw(st.sampled_from(FORMATS))


def _write(df: pd.DataFrame, fmt: str, folder: Path) -> Path | None:
    """The dataset as the user would have it on disk; None when that format cannot hold these values."""
    try:
        if fmt.startswith("csv"):
            path = folder / "data.csv"
            df.to_csv(path, index=False, sep=fmt[3:] or ",")
        elif fmt == "tsv":
            path = folder / "data.tsv"
            df.to_csv(path, index=False, sep="\t")
        elif fmt == "jsonl":
            path = folder / "data.jsonl"
            path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in df.to_dict("records")))
        elif fmt == "json":
            path = folder / "data.json"
            df.to_json(path, orient="records")
        else:
            path = folder / "data.parquet"
            df.to_parquet(path, index=False)
    except Exception:  # noqa: BLE001 - e.g. parquet cannot store a column mixing ints and strings
        return None
    return path


@st.composite
def config_overrides(draw: st.DrawFn) -> dict:
    cls: dict = {}
    if not draw(st.sampled_from([False, False, True])):  # most examples keep a valid config, to reach the data
        return {"classification": cls, "layers": [0], "split": None}
    if draw(st.booleans()):
        cls["thresholds"] = draw(THRESHOLDS)
    if draw(st.booleans()):
        cls["classifiers"] = draw(st.lists(st.sampled_from(["logistic", "ksparse", "tree"]), max_size=2, unique=True))
        cls["k"] = draw(st.lists(st.sampled_from([0, 1, 3, 100, True]), max_size=2))
    if draw(st.booleans()):
        cls["bootstrap"] = draw(st.sampled_from([0, 5, True, -1, 2.5]))
    if draw(st.booleans()):
        cls["poolings"] = draw(st.lists(st.sampled_from(["mean", "max", "sum", "median"]), max_size=2, unique=True))
    layers = draw(st.sampled_from([[0], [0], [0], [3], [4], [True], [-1]]))
    split = draw(st.sampled_from([None, {"validation": 0.45, "test": 0.45}, {"test": 0.3}]))
    return {"classification": cls, "layers": layers, "split": split}


def _nothing_partial(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    temps = [p for p in data_dir.rglob("*") if ".mosaic-tmp." in p.name]
    assert not temps, temps
    for p in data_dir.rglob("*.parquet"):
        pd.read_parquet(p)  # every parquet left is complete
    for man in (data_dir / "hidden").rglob("manifest.json"):
        assert HiddenCache(man.parent).is_valid(deep=True), man.parent


@pytest.mark.timeout(1800)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=datasets(), over=config_overrides())
def test_random_input_ends_in_results_or_one_clear_line(data, over, tiny_model_dir: Path, dagster_home: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    df, fmt = data
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write(df, fmt, folder)
        hypothesis.assume(path is not None)
        config = {
            "name": "fuzz", "data_dir": str(folder / "data"),
            "models": [{"name": "tiny", "id": str(tiny_model_dir), "layers": over["layers"], "max_length": 16,
                        "batch_tokens": 64, "saes": [dict(FAST_SAE)]}],
            "datasets": [{"name": "fz", "path": str(path), "language": "en"}],
            "classification": {**FAST_CLASSIFICATION, **over["classification"]},
            "mlflow": {"tracking_uri": mlflow_store(dagster_home)},
        }
        if over["split"]:
            config["split"] = over["split"]
        (folder / "c.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
        capsys.readouterr()
        code = main(["run", "--config", str(folder / "c.yaml"), "--quiet"])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1] if err.strip() else ""
        hypothesis.event(f"exit {code}: {re.sub(r'/[^ :]*', '<path>', last)[15:60] if code else 'results'}")
        assert "Traceback" not in err, err[-3000:]
        if code == 0:
            assert main(["results", "--config", str(folder / "c.yaml"), "--format", "csv"]) == 0
            table = capsys.readouterr().out.strip().splitlines()
            assert len(table) >= 2, "exit 0 but no results rows"
        else:
            assert code == 1, err[-3000:]
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            ours = [ln for ln in lines if ln.startswith("mosaic: error: ")]
            assert len(ours) == 1 and lines[-1] == ours[0], err[-3000:]
            msg = ours[0].removeprefix("mosaic: error: ")
            assert not RAW_EXCEPTION.match(msg), f"a raw exception reached the user: {msg}"
            assert len(msg) < 600
        _nothing_partial(folder / "data")
