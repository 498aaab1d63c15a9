"""Bad input, end to end: each row goes through the CLI and through the Dagster step it fails in.

For every row the user must get one line ``mosaic: error: <the input that is wrong and the fix>``
and exit code 1; the failed Dagster step must carry the same message (that is what the UI shows);
and nothing partial may be left on disk for the failed partition (no parquet, no cache folder, no
temp file). docs/reliability.md lists the same matrix for users.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mosaic_dag.cli import main
from mosaic_dag.lm.extract import HiddenCache
from tests.support.models import fast_config
from tests.support.runs import (
    assert_no_dataset_artifact,
    assert_no_hidden_artifact,
    assert_step_failed_with,
    dagster_failures,
    error_line,
    run_cli,
    temp_leftovers,
)

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------- datasets

GOOD_TEXTS = [f"text number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rain", "sun"] * 5)]


def _rows(labels: list[object], texts: list[object] | None = None) -> list[dict]:
    texts = texts if texts is not None else GOOD_TEXTS[: len(labels)]
    return [{"text": t, "label": lab} for t, lab in zip(texts, labels)]


BALANCED = [0, 1] * 10


@dataclass
class DatasetCase:
    id: str
    rows: list[dict] | None
    expect: list[str]
    suffix: str = ".jsonl"
    fields: dict = field(default_factory=dict)
    tail: str = ""
    raw: str | None = None  # the file's exact text (a header-only CSV cannot be written from rows)

    def write(self, folder: Path) -> Path:
        path = folder / f"bad{self.suffix}"
        if self.raw is not None:
            path.write_text(self.raw)
            return path
        if self.rows is None:
            return folder / "missing" / "bad.csv"  # does not exist
        if self.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows) + self.tail)
        elif self.suffix == ".parquet":
            pd.DataFrame(self.rows).to_parquet(path, index=False)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, like a killed copy
        elif self.suffix == "/":
            path = folder / "tweets"
            path.mkdir()
            (path / "train_text.txt").write_text("\n".join(r["text"] for r in self.rows) + "\n")
            (path / "train_labels.txt").write_text("\n".join(str(r["label"]) for r in self.rows) + "\n")
        elif self.suffix == ".csv":
            pd.DataFrame(self.rows).to_csv(path, index=False)
        else:
            path.write_bytes(b"PK\x03\x04 not a spreadsheet mosaic reads")
        return path


DATASET_CASES = [
    DatasetCase("missing-text-field", _rows(BALANCED), ["text_field 'body' is not a column", "columns:"],
                fields={"text_field": "body"}),
    DatasetCase("missing-label-field", _rows(BALANCED), ["label_field 'labl' is not a column", "columns:"],
                fields={"label_field": "labl"}),
    DatasetCase("empty-text", _rows(BALANCED, GOOD_TEXTS[:19] + [""]),
                ["text_field 'text' is empty or whitespace in 1 rows", "drop those rows"]),
    DatasetCase("whitespace-text", _rows(BALANCED, ["  \t "] + GOOD_TEXTS[1:20]),
                ["text_field 'text' is empty or whitespace in 1 rows", "(first: row 0)", "drop those rows"]),
    DatasetCase("missing-text-csv", _rows(BALANCED, [None] * 2 + GOOD_TEXTS[2:20]), [
        "text_field 'text' has 2 missing or non-text values", "drop them"], suffix=".csv"),
    DatasetCase("none-labels", _rows([0, 1] * 9 + [None, None]),
                ["label_field 'label' is empty in 2 rows", "drop or fill those rows"]),
    DatasetCase("nan-labels-csv", _rows([0, 1] * 9 + [float("nan"), 1]),
                ["label_field 'label' is empty in 1 rows", "drop or fill those rows"], suffix=".csv"),
    DatasetCase("single-class", _rows(["spam"] * 20),
                ["label_field 'label' has a single class ('spam')", "at least 2"]),
    DatasetCase("mixed-label-types", _rows([0, 1] * 9 + ["pos", "neg"]),
                ["label_field 'label' mixes integer and text labels", "use all integers or all strings"]),
    # pandas reads this column as all strings ('0', '1', 'pos'): told apart by value, not by dtype
    DatasetCase("mixed-labels-csv", _rows([0, 1] * 9 + ["pos", "neg"]),
                ["label_field 'label' mixes integer and text labels", "'pos' in row 18"], suffix=".csv"),
    DatasetCase("fractional-labels", _rows([0.5, 1.5] * 10),
                ["label_field 'label' holds a number that is not a whole class id (0.5 in row 0)"]),
    DatasetCase("shared-text-via-split-column",
                [{"text": t, "label": i % 2, "split": "train"} for i, t in enumerate(GOOD_TEXTS[:16])]
                + [{"text": t, "label": i % 2, "split": "test"} for i, t in enumerate(GOOD_TEXTS[:4])],
                ["dataset 'bad'.en: 4 texts are in more than one split", "in test and train",
                 "set drop_shared_texts: true", "or allow_shared_texts: true"]),
    DatasetCase("one-class-in-train-split",
                [{"text": t, "label": "a" if i < 14 else "b", "split": "train" if i < 14 else "test"}
                 for i, t in enumerate(GOOD_TEXTS)],
                ["the train split has a single class ('a')", "fix the split column"]),
    DatasetCase("header-only-csv", [], ["the source has a header but no rows", "add labelled rows"], suffix=".csv",
                raw="text,label\n"),
    DatasetCase("one-row-per-class", [], ["only 1 row(s) left in train to carve the validation split", "add rows"],
                suffix=".csv", raw="text,label\nhello there,0\nbye now,1\n"),
    DatasetCase("local-path-missing", None, ["does not exist", "fix 'path' in the config"]),
    DatasetCase("unsupported-file-type", [], ["has an unsupported file type", "use .csv, .tsv, .jsonl"], suffix=".xlsx"),
    DatasetCase("truncated-parquet", _rows(BALANCED), ["is not readable parquet", "fix or re-export the file"],
                suffix=".parquet"),
    DatasetCase("malformed-jsonl", _rows(BALANCED), ["line 21 is not valid JSON", "fix that line"],
                tail='{"text": "half a line", "lab\n'),
    DatasetCase("text-lines-bad-label", _rows([0, 1] * 9 + [1, "positive"]),
                ["train_labels.txt line 20 is 'positive', not an integer label", "fix that line"], suffix="/"),
]


@pytest.mark.parametrize("case", DATASET_CASES, ids=[c.id for c in DATASET_CASES])
def test_bad_dataset_one_line_same_on_dagster_step_nothing_left(case: DatasetCase, tmp_path: Path, tiny_model_dir: Path,
                                                                 home: Path, capsys: pytest.CaptureFixture[str]):
    path = case.write(tmp_path)
    ds = {"name": "bad", "path": str(path), "text_field": "text", "label_field": "label", "language": "en", **case.fields}
    config = fast_config(tmp_path, tiny_model_dir, datasets=[ds])

    code, stderr = run_cli(config, capsys)

    assert code == 1
    line = error_line(stderr)
    assert line.startswith("dataset 'bad'"), line
    for fragment in case.expect:
        assert fragment in line, line
    if case.rows is None:
        assert str(path) in line
    assert_step_failed_with(config, "dataset", line)
    assert_no_dataset_artifact(tmp_path / "data", "bad")
    assert not (tmp_path / "data" / "hidden").exists()


# --------------------------------------------------------------------------------------------- models, layers, SAEs


def _write_sae(folder: Path, d_in: int, model_name: str | None = None) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=model_name, hook_name="blocks.0.hook_resid_post") if model_name else SAEMetadata()
    StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=32, metadata=meta)).save_model(folder)
    return folder


@dataclass
class ModelCase:
    id: str
    expect: list[str]
    layers: list[int] = field(default_factory=lambda: [0])
    model_id: Callable[[Path, Path], str] | None = None  # (tmp_path, tiny model folder) -> model id
    sae: Callable[[Path], dict] | None = None


def _bad_config_json(folder: Path, model_dir: Path) -> str:
    import shutil

    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text('{"model_type": "gemma3_text", "num_hidden_layers": 4,')  # cut short
    return str(folder)


EARLY_MODEL_CASES = [
    ModelCase("layer-out-of-range", ["models.0.layers: layers [9] out of range for model 'tiny' with 4 blocks",
                                     "use 0..3"], layers=[0, 9]),
    ModelCase("model-folder-missing", ["model 'tiny'", "looks like a path but is not a folder", "fix 'id'"],
              model_id=lambda t, m: str(t / "no-such-model")),
    ModelCase("invalid-config-json", ["model 'tiny'", "config.json' is not valid JSON", "at line 1", "save the model again"],
              model_id=lambda t, m: _bad_config_json(t / "broken-model", m)),
]


@pytest.mark.parametrize("case", EARLY_MODEL_CASES, ids=[c.id for c in EARLY_MODEL_CASES])
def test_bad_model_or_layer_fails_validate_and_run_before_any_compute(case: ModelCase, tmp_path: Path,
                                                                      tiny_model_dir: Path, home: Path,
                                                                      capsys: pytest.CaptureFixture[str]):
    extra: dict[str, object] = {}
    if case.model_id:
        extra["id"] = case.model_id(tmp_path, tiny_model_dir)
    config = fast_config(tmp_path, tiny_model_dir, layers=case.layers, **extra)

    assert main(["validate", "--config", str(config)]) == 1
    validate_line = error_line(capsys.readouterr().err)
    code, stderr = run_cli(config, capsys)
    assert code == 1
    line = error_line(stderr)
    assert line == validate_line
    for fragment in case.expect:
        assert fragment in line, line
    assert dagster_failures(config) == []  # no Dagster run was even started
    assert not (tmp_path / "data").exists()


MODEL_CASES = [
    ModelCase("sae-d_in-mismatch", ["sae d_in=32 does not match model tiny-gemma3 d_model=64",
                                    "pick an SAE trained on this model"],
              sae=lambda t: {"origin": "local", "name": "wrong-width", "path": str(_write_sae(t / "sae32", 32))}),
    ModelCase("sae-model-mismatch", ["sae model_name=gpt2 does not match model tiny-gemma3",
                                     "pick an SAE trained on tiny-gemma3"],
              sae=lambda t: {"origin": "local", "name": "gpt2-sae",
                             "path": str(_write_sae(t / "sae-gpt2", 64, model_name="gpt2"))}),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_bad_sae_fails_hidden_states_before_any_forward(case: ModelCase, tmp_path: Path,
                                                                       tiny_model_dir: Path, home: Path,
                                                                       capsys: pytest.CaptureFixture[str]):
    extra: dict[str, object] = {}
    if case.sae:
        extra["saes"] = [case.sae(tmp_path)]
    config = fast_config(tmp_path, tiny_model_dir, layers=case.layers, **extra)

    code, stderr = run_cli(config, capsys)

    assert code == 1
    line = error_line(stderr)
    for fragment in case.expect:
        assert fragment in line, line
    assert_step_failed_with(config, "hidden_states", line)
    assert (tmp_path / "data" / "datasets" / "toy" / "en.parquet").exists()  # the step before it succeeded
    assert_no_hidden_artifact(tmp_path / "data")


def test_sae_mismatch_library_check_names_both_sides():
    from mosaic_dag.sae.compat import SaeInfo, check_compatible
    from mosaic_dag.sae.spec import SaeMismatchError

    info = SaeInfo(d_in=2304, width=16384, architecture="jumprelu", hook_name="blocks.12.hook_resid_post", layer=12,
                   site="resid_post", model_name="gemma-2-2b", signed=False)
    with pytest.raises(SaeMismatchError) as err:
        check_compatible(info, "google/gemma-3-270m", 640, 12)
    msg = str(err.value)
    assert "\n" not in msg and "d_in=2304" in msg and "d_model=640" in msg and "pick an SAE" in msg
    with pytest.raises(SaeMismatchError, match=r"model_name=gemma-2-2b does not match model google/gemma-2-9b"):
        check_compatible(SaeInfo(**{**info.__dict__, "d_in": 3584}), "google/gemma-2-9b", 3584, 12)
    with pytest.raises(SaeMismatchError, match=r"layer=12 .* does not match .* layer=6"):
        check_compatible(info, "google/gemma-2-2b", 2304, 6)
    check_compatible(info, "google/gemma-2-2b", 2304, 12)  # the right pairing passes


# --------------------------------------------------------------------------------------------- offline hub


def test_unknown_hub_dataset_and_model_while_offline(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, so these run as real `mosaic` processes."""
    hub_ds = {"name": "hub", "hf_name": "mosaic-test/no-such-dataset", "language": "en"}
    for sub in ("ds", "model"):
        (tmp_path / sub).mkdir()
    cases = {
        "dataset": (fast_config(tmp_path / "ds", tiny_model_dir, layers=[0], datasets=[hub_ds]),
                    ["dataset 'hub': hf_name 'mosaic-test/no-such-dataset' could not be loaded", "Offline",
                     "pre-fill the Hugging Face cache", "or use a local 'path'"]),
        "hidden_states": (fast_config(tmp_path / "model", tiny_model_dir, layers=[0]),
                          ["model 'tiny'", "'mosaic-test/no-such-model'", "cache"]),
    }
    model_cfg = cases["hidden_states"][0]
    raw = yaml.safe_load(model_cfg.read_text())
    raw["models"][0]["id"] = "mosaic-test/no-such-model"
    model_cfg.write_text(yaml.safe_dump(raw))

    procs = {}
    for step, (config, _) in cases.items():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf_home"), "DAGSTER_HOME": str(config.parent / "dagster_home"),
               "MOSAIC_CACHE": str(tmp_path / "mosaic_cache"), "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        procs[step] = subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "run", "--config", str(config), "--quiet"],
                                       cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for step, (config, expect) in cases.items():
        out, err = procs[step].communicate(timeout=240)
        assert procs[step].returncode == 1, out + err
        line = error_line(err)
        for fragment in expect:
            assert fragment.lower() in line.lower(), line
        monkeypatch.setenv("DAGSTER_HOME", str(config.parent / "dagster_home"))
        assert_step_failed_with(config, step, line)
        assert_no_hidden_artifact(config.parent / "data")
    assert_no_dataset_artifact(cases["dataset"][0].parent / "data", "hub")


# --------------------------------------------------------------------------------------------- corrupt cache


def _flip_bytes(path: Path, at: int, n: int = 8) -> None:
    blob = bytearray(path.read_bytes())
    at = min(at, len(blob) - n)
    blob[at:at + n] = bytes(b ^ 0xFF for b in blob[at:at + n])
    path.write_bytes(bytes(blob))


def test_corrupt_cache_is_recomputed_not_crashed_on(tmp_path: Path, tiny_model_dir: Path, home: Path):
    from mosaic_dag.runner import run_experiment

    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2])
    run_experiment(config, progress=False, echo=lambda *_: None)
    caches = {int(p.parent.parent.name[1:]): HiddenCache(p.parent) for p in (tmp_path / "data" / "hidden").rglob("manifest.json")}
    assert sorted(caches) == [0, 2] and all(c.is_valid(deep=True) for c in caches.values())
    before = {layer: c.load_all() for layer, c in caches.items()}

    shard = min(caches[0].path.glob("shard-*.safetensors"))
    _flip_bytes(shard, at=shard.stat().st_size // 2)  # same size: only the checksum can tell
    caches[2].manifest_path.write_text(caches[2].manifest_path.read_text()[:40])  # truncated JSON
    assert not caches[0].is_valid(deep=True) and not caches[2].is_valid(deep=False)

    second = run_experiment(config, progress=False, echo=lambda *_: None)

    hidden = {s.partition: s.metadata for s in second.steps if s.asset == "hidden_states"}
    assert list(hidden) == ["toy.en"]  # one partition per dataset: both layers in one forward pass
    assert hidden["toy.en"]["cache_hit"] is False and hidden["toy.en"]["layers_computed"] == {"tiny": [0, 2]}
    assert all(c.is_valid(deep=True) for c in caches.values())
    for layer, cache in caches.items():
        again = cache.load_all()
        assert (again.token_ids == before[layer].token_ids).all() and (again.acts == before[layer].acts).all()
    assert not temp_leftovers(tmp_path / "data")


# --------------------------------------------------------------------------------------------- failed writes


def test_disk_full_while_writing_the_dataset_leaves_nothing(tmp_path: Path, tiny_model_dir: Path, home: Path,
                                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    calls = []

    def full_disk(self, path, *args, **kwargs):  # DataFrame.to_parquet's signature
        calls.append(path)
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    code, stderr = run_cli(config, capsys)

    assert calls, "the parquet writer was never called: the fault was not injected"
    assert code == 1
    line = error_line(stderr)
    target = tmp_path / "data" / "datasets" / "toy" / "en.parquet"
    assert f"could not write '{target}'" in line and "No space left on device" in line, line
    assert "free disk space or fix write permission" in line
    assert_step_failed_with(config, "dataset", line)
    assert_no_dataset_artifact(tmp_path / "data", "toy")


def test_disk_full_while_writing_the_hidden_cache_leaves_nothing(tmp_path: Path, tiny_model_dir: Path, home: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch):
    from mosaic_dag.lm import extract
    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2])
    calls = []

    def full_disk(tensors, filename, *args, **kwargs):  # safetensors.numpy.save_file's signature
        calls.append(filename)
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert hasattr(extract, "save_file"), "extract.py no longer writes shards with safetensors' save_file; update this test"
    monkeypatch.setattr(extract, "save_file", full_disk)
    code, stderr = run_cli(config, capsys)

    assert calls, "the shard writer was never called: the fault was not injected"
    assert code == 1
    line = error_line(stderr)
    assert "could not write" in line and str(tmp_path / "data" / "hidden" / "tiny") in line, line
    assert "No space left on device" in line and "free disk space" in line
    assert_step_failed_with(config, "hidden_states", line)
    assert_no_hidden_artifact(tmp_path / "data")


def test_data_dir_that_cannot_be_created_names_the_path(tmp_path: Path, tiny_model_dir: Path, home: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    """A real OS failure (no fault injection): data_dir points below a regular file."""
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["data_dir"] = str(blocker / "data")
    config.write_text(yaml.safe_dump(cfg))

    code, stderr = run_cli(config, capsys)

    assert code == 1
    line = error_line(stderr)
    assert f"could not write '{blocker / 'data' / 'datasets' / 'toy' / 'en.parquet'}'" in line, line
    assert "Not a directory" in line and str(blocker / "data" / "datasets" / "toy") in line
    assert_step_failed_with(config, "dataset", line)
    assert blocker.read_text() == "a file where a folder should be\n"


# --------------------------------------------------------------------------------------------- config typos

CONFIG_CASES = {
    "unknown-key": ({"models": [{"name": "m", "layers": [1], "layres": 2}], "datasets": [{"name": "d", "path": "x"}]},
                    ["models.0.layres: unknown key", "check the spelling"]),
    "wrong-type": ({"models": [{"name": "m", "layers": "six"}], "datasets": [{"name": "d", "path": "x"}]},
                   ["models.0.layers:", "list"]),
    "bad-choice": ({"models": [{"name": "m", "layers": [1], "dtype": "float64"}], "datasets": [{"name": "d", "path": "x"}]},
                   ["models.0.dtype: allowed:", "'float32'"]),
    "negative-layer": ({"models": [{"name": "m", "layers": [-1]}], "datasets": [{"name": "d", "path": "x"}]},
                       ["models.0.layers: layers must be >= 0"]),
    "both-path-and-hub": ({"models": [{"name": "m", "layers": [1]}], "datasets": [{"name": "d", "path": "x", "hf_name": "y"}]},
                          ["datasets.0: give", "'path'", "'hf_name'"]),
    "bad-partition-label": ({"models": [{"name": "m.1", "layers": [1]}], "datasets": [{"name": "d", "path": "x"}]},
                            ["models.0.name: name 'm.1' may hold only letters, digits"]),
    "missing-models": ({"datasets": [{"name": "d", "path": "x"}]}, ["models: required key is missing"]),
    "not-yaml": ("models: [unclosed\n", ["is not valid YAML"]),
    "no-such-file": (None, ["does not exist; pass --config with a YAML file"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=list(CONFIG_CASES))
def test_config_typo_one_line_before_any_run(case: str, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]):
    data, expect = CONFIG_CASES[case]
    config = tmp_path / "c.yaml"
    if isinstance(data, dict):
        config.write_text(yaml.safe_dump(data))
    elif isinstance(data, str):
        config.write_text(data)

    code = main(["run", "--config", str(config)])
    err = capsys.readouterr().err

    assert code == 1
    assert err.strip().count("\n") == 0, err  # nothing ran, so nothing else was printed
    line = error_line(err)
    assert str(config) in line, line
    for fragment in expect:
        assert fragment in line, line
    from dagster import DagsterInstance, RunsFilter

    runs = DagsterInstance.get().get_runs(filters=RunsFilter(tags={"mosaic/config": str(config.resolve())}))
    assert runs == []  # validated before any compute
    assert not (tmp_path / "mosaic_data").exists()


def test_config_typo_under_dagster_dev_fails_the_step_with_the_same_line(tmp_path: Path, home: Path,
                                                                        capsys: pytest.CaptureFixture[str]):
    """`dagster dev` reads $MOSAIC_CONFIG when a step runs: the step shows the line the CLI prints."""
    from dagster import DagsterInstance, materialize

    from mosaic_dag.definitions import build_assets, resources

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "layers": [1], "layres": 2}],
                                      "datasets": [{"name": "d", "path": "x"}]}))
    assert main(["validate", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err)

    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("dataset", ["d.en"])
    # the code location could not read the config: its assets are built without it, and the step says why
    result = materialize(build_assets(None), selection=["dataset"], partition_key="d.en", instance=instance,
                         raise_on_error=False, resources=resources(config), tags={"mosaic/config": str(config.resolve())})
    assert not result.success
    assert_step_failed_with(config, "dataset", line)


# --------------------------------------------------------------------------------------------- security basics
# Untrusted files must never execute code when read: no pickle, no remote code, no unsafe YAML.

SOURCE_DIRS = ("mosaic_dag", "assets", "resources")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 10
    return files


def _dotted(node: object) -> str:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: object, name: str) -> object:
    import ast

    for kw in call.keywords:  # type: ignore[attr-defined]
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def security_findings(path: Path, root: Path = ROOT) -> list[str]:
    """Unsafe deserialisation / code execution in one source file, as 'file:line: what'."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load",) and _kw(node, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            if _kw(node, "allow_pickle") is True:
                found.append(f"{where}: {name}(allow_pickle=True)")
            if _kw(node, "trust_remote_code") is True:
                found.append(f"{where}: {name}(trust_remote_code=True)")
            if last in ("read_pickle", "to_pickle") or name == "joblib.load":  # pickle underneath
                found.append(f"{where}: {name}")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all") or (
                    name == "yaml.load" and _dotted(_kw(node, "Loader")).rsplit(".", 1)[-1] in UNSAFE_YAML_LOADERS):
                found.append(f"{where}: {name} with an unsafe loader")
            if name in ("eval", "exec", "os.system") or _kw(node, "shell") is True:
                found.append(f"{where}: {name}{' shell=True' if _kw(node, 'shell') is True else ''}")
            if name.endswith("io.load") and _kw(node, "trusted") is True:
                found.append(f"{where}: skops load trusting every type")
    return found


def test_security_scan_finds_the_patterns_it_looks_for(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle\nimport torch, yaml, numpy as np, subprocess\n"
        "torch.load('m.pt')\ntorch.load('m.pt', weights_only=True)\nnp.load('a.npz', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\nyaml.load(s, Loader=yaml.Loader)\n"
        "yaml.load(s, Loader=yaml.SafeLoader)\nsubprocess.run('ls', shell=True)\n")
    found = [f.split(": ", 1)[1] for f in security_findings(sample, root=tmp_path)]
    assert found == ["imports pickle", "torch.load without weights_only=True", "np.load(allow_pickle=True)",
                     "AutoModel.from_pretrained(trust_remote_code=True)", "yaml.load with an unsafe loader",
                     "subprocess.run shell=True"]


def test_no_pickle_remote_code_or_unsafe_yaml_in_the_source_tree():
    findings = [f for path in _sources() for f in security_findings(path)]
    assert findings == [], "\n".join(findings)


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    from mosaic_dag.config import ModelConfig

    assert ModelConfig(name="m", layers=[0]).trust_remote_code is False
    models = "".join(f.read_text() for f in sorted((ROOT / "mosaic_dag" / "lm").rglob("*.py")))  # the model loaders
    assert "trust_remote_code=cfg.trust_remote_code" in models.replace('"trust_remote_code": ', "trust_remote_code=")


def test_mlflow_params_never_include_secret_looking_keys():
    from mosaic_dag.tracking import safe_params

    params = {"layer": 6, "model": "google/gemma-3-270m", "hf_token": "hf_abc", "HF_TOKEN": "hf_abc",
              "api_key": "k", "OPENAI_APIKEY": "k", "db_password": "p", "aws_secret_access_key": "s",
              "gcp_credentials": "c", "Secret": "s", "huggingface_token_path": "/x", "batch_tokens": 8192,
              "private_key": "k", "s3_access_key": "k", "passwd": "p"}
    kept = safe_params(params)
    assert set(kept) == {"layer", "model", "batch_tokens"}, kept  # a token count is not a secret
    assert kept == {"layer": "6", "model": "google/gemma-3-270m", "batch_tokens": "8192"}
    assert len(safe_params({"long": "x" * 10_000})["long"]) == 500
