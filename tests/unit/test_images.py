"""Image datasets normalised like text ones: bundled digits, class folders, tables, HF Image feature, bad images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mosaic_dag.config import parse_config
from mosaic_dag.data.datasets import COLUMNS, load_dataset
from mosaic_dag.errors import ConfigError, DatasetError
from mosaic_dag.data.images import decode_png
from mosaic_dag.paths import dataset_file
from mosaic_dag.data.step import build_dataset



def _dataset(**fields):
    cfg = parse_config({"models": [{"name": "m", "layers": [0]}], "datasets": [{"name": "img", **fields}]})
    return cfg, cfg.dataset("img")


def _png(value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, value).save(out, format="PNG")
    return out.getvalue()


def _check_normalised(frame: pd.DataFrame, n_classes: int) -> None:
    assert list(frame.columns) == COLUMNS + ["image"]
    assert (frame["language"] == "image").all()
    assert frame["text"].str.fullmatch(r"image:[0-9a-f]{64}").all()
    assert frame["label"].nunique() == n_classes
    for split in ("train", "test"):
        assert frame.loc[frame["split"] == split, "label"].nunique() == n_classes
    assert frame.groupby("text")["split"].nunique().max() == 1  # no image in two splits
    img = decode_png(frame["image"].iloc[0])
    assert img.mode == "RGB" and img.width > 0


def test_bundled_digits_are_the_real_scikit_learn_digits():
    from sklearn.datasets import load_digits

    cfg, d = _dataset(path="bundled:digits")
    assert d.modality == "image" and d.token_selection == "image"
    assert cfg.dataset_languages("img") == ["image"]
    frame = load_dataset(d, "image", cfg.split)
    raw = load_digits()
    dup = pd.Series([im.tobytes() for im in raw.images]).duplicated().sum()
    assert len(frame) == len(raw.images) - dup  # exact duplicate images dropped before our split
    _check_normalised(frame, 10)
    assert sorted(frame["label_name"].unique()) == sorted(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    first = np.asarray(decode_png(frame["image"].iloc[0]).convert("L"), dtype=np.float64)
    np.testing.assert_allclose(first, np.round(raw.images[0] * 255 / 16), atol=0)
    assert frame["label"].iloc[0] == raw.target[0]


def test_descriptions_share_the_image_label_ids():
    cfg, d = _dataset(path="bundled:digits", max_rows=200,
                      descriptions={"language": "en", "templates": ["a handwritten digit {label_name}", "the digit {label_name}",
                                                                    "the number {label_name}", "a {label_name}"]})
    assert cfg.dataset_languages("img") == ["image", "en"]
    images = load_dataset(d, "image", cfg.split)
    texts = load_dataset(d, "en", cfg.split)
    assert list(texts.columns) == COLUMNS
    assert len(texts) == 40 and "a handwritten digit seven" in set(texts["text"])
    pairs = set(zip(images["label"], images["label_name"]))
    assert set(zip(texts["label"], texts["label_name"])) == pairs
    assert set(texts.loc[texts["split"] == "test", "label"]) == set(range(10))


def test_descriptions_in_several_languages_with_their_own_class_words():
    fr = {"language": "fr", "templates": ["un chiffre {label_name}", "le chiffre {label_name}", "le nombre {label_name}",
                                          "un {label_name} manuscrit"],
          "names": {"zero": "zéro", "one": "un", "seven": "sept"}}
    cfg, d = _dataset(path="bundled:digits", max_rows=200, descriptions=[{"language": "en"}, fr])
    assert cfg.dataset_languages("img") == ["image", "en", "fr"]
    images = load_dataset(d, "image", cfg.split)
    texts = load_dataset(d, "fr", cfg.split)
    assert {"le chiffre sept", "un chiffre zéro", "le nombre two"} <= set(texts["text"])  # unnamed classes as is
    assert set(zip(texts["label"], texts["label_name"])) == set(zip(images["label"], images["label_name"]))
    assert (texts["language"] == "fr").all() and texts["id"].str.startswith("img.fr.").all()
    with pytest.raises(DatasetError, match=r"has no partition 'de'; it has \['image', 'en', 'fr'\]"):
        load_dataset(d, "de", cfg.split)
    _, bad = _dataset(path="bundled:digits", descriptions={"names": {"seventy": "x"}})
    with pytest.raises(DatasetError, match=r"descriptions.names has \['seventy'\], which are not classes"):
        load_dataset(bad, "en", cfg.split)


def test_class_folders_with_and_without_split_folders(tmp_path: Path):
    flat = tmp_path / "flat"
    for c, cls in enumerate(["cat", "dog", "eel"]):
        (flat / cls).mkdir(parents=True)
        for i in range(8):
            (flat / cls / f"{i}.png").write_bytes(_png(30 * c + i))
    (flat / "cat" / "notes.txt").write_text("not an image")
    cfg, d = _dataset(path=str(flat), modality="image")
    frame = load_dataset(d, "image", cfg.split)
    assert len(frame) == 24
    _check_normalised(frame, 3)
    assert sorted(frame["label_name"].unique()) == ["cat", "dog", "eel"]

    split = tmp_path / "split"
    count = 0  # every image distinct, so the split-leakage check has nothing to stop
    for s, n in (("train", 6), ("val", 2), ("test", 3)):
        for cls in ("cat", "dog"):
            (split / s / cls).mkdir(parents=True)
            for i in range(n):
                (split / s / cls / f"{i}.png").write_bytes(_png(10 * count, size=(4 + i, 4)))
                count += 1
    cfg, d = _dataset(path=str(split), modality="image")
    frame = load_dataset(d, "image", cfg.split)
    assert frame["split"].value_counts().to_dict() == {"train": 12, "test": 6, "validation": 4}


def test_table_with_paths_or_bytes_and_hf_image_feature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(20):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(10 * i, mode="RGB"))
        rows.append({"file": f"img/{i}.png", "kind": "a" if i % 2 else "b", "bytes": _png(10 * i + 1)})
    pd.DataFrame(rows)[["file", "kind"]].to_csv(tmp_path / "t.csv", index=False)
    cfg, d = _dataset(path=str(tmp_path / "t.csv"), modality="image", image_field="file", label_field="kind")
    by_path = load_dataset(d, "image", cfg.split)
    _check_normalised(by_path, 2)
    pd.DataFrame(rows)[["bytes", "kind"]].to_parquet(tmp_path / "t.parquet")
    cfg, d = _dataset(path=str(tmp_path / "t.parquet"), modality="image", image_field="bytes", label_field="kind")
    by_bytes = load_dataset(d, "image", cfg.split)
    _check_normalised(by_bytes, 2)
    assert set(by_bytes["text"]).isdisjoint(by_path["text"])  # different pixels, different identity

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    hub = tmp_path / "hub"
    for s in ("train", "test"):
        for c, cls in enumerate(["ant", "bee"]):
            (hub / s / cls).mkdir(parents=True)
            for i in range(6):
                (hub / s / cls / f"{i}.png").write_bytes(_png(100 * c + 7 * i + (s == "test")))
    cfg, d = _dataset(hf_name=str(hub), modality="image")
    frame = load_dataset(d, "image", cfg.split)
    _check_normalised(frame, 2)
    assert sorted(frame["label_name"].unique()) == ["ant", "bee"]  # names from the ClassLabel feature
    assert (frame["split"] == "test").sum() == 12


def _bad_png_rows(tmp_path: Path, value: bytes | str | None) -> Path:
    """Ten good images and a bad row 6: bytes in a parquet, or (a str) a path in a CSV."""
    if isinstance(value, str):
        for i in range(10):
            (tmp_path / f"{i}.png").write_bytes(_png(i))
        rows = [{"image": f"{i}.png", "label": i % 2} for i in range(10)]
        rows[6]["image"] = value
        pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)
        return tmp_path / "bad.csv"
    rows = [{"image": _png(i), "label": i % 2} for i in range(10)]
    rows[6]["image"] = value
    pd.DataFrame(rows).to_parquet(tmp_path / "bad.parquet")
    return tmp_path / "bad.parquet"


def _cmyk() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize(("value", "expect"), [
    (b"\x89PNG not really", "row 6 (image): image is unreadable"),
    (b"", "row 6 (image): has no image"),
    (None, "row 6 (image): has no image"),
    ("missing.png", "image file '"),
    ("cmyk", "image mode 'CMYK' is not supported; convert it to RGB or L"),
])
def test_bad_images_fail_with_one_line_and_no_partial_artifact(value, expect: str, tmp_path: Path):
    value = _cmyk() if value == "cmyk" else value
    path = _bad_png_rows(tmp_path, value)
    yaml_cfg = {"name": "x", "data_dir": str(tmp_path / "data"), "models": [{"name": "m", "layers": [0]}],
                "datasets": [{"name": "img", "path": str(path), "modality": "image"}]}
    cfg = parse_config(yaml_cfg)
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "img", "image")
    line = str(err.value)
    assert "\n" not in line and line.startswith("dataset 'img': row 6 (image)") and expect in line, line
    assert not dataset_file(cfg, "img", "image").exists()
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))


def test_zero_size_image_is_refused():
    from mosaic_dag.data.images import to_png

    with pytest.raises(DatasetError, match="row 3: image has zero size"):
        to_png(np.zeros((0, 4), dtype=np.uint8), "row 3")


@pytest.mark.parametrize(("fields", "expect"), [
    ({"path": "bundled:digits", "tokens": "words"}, "tokens"),
    ({"path": "x.csv", "tokens": "image"}, "needs modality 'image'"),
    ({"path": "bundled:digits", "prompt_template": "a digit"}, "must contain {image}"),
    ({"path": "bundled:digits", "descriptions": {"templates": ["a", "b {label_name}", "c {label_name}", "d {label_name}"]}},
     "must contain {label_name}"),
    ({"path": "bundled:digits", "descriptions": {"language": "image"}}, "language 'image'"),
    ({"path": "x.csv", "descriptions": {}}, "descriptions needs modality 'image'"),
    ({"path": "x.csv", "image_field": "file"}, "image_field needs modality 'image'"),
    ({"path": "bundled:digits", "language_field": "lang", "languages": ["en"]}, "for text datasets"),
    ({"path": "bundled:digits", "language": "fr"}, "drop 'language'"),
    ({"path": "bundled:digits", "descriptions": [{"language": "en"}, {"language": "en"}]}, "must be unique"),
])
def test_image_config_errors_are_one_line(fields: dict, expect: str):
    with pytest.raises(ConfigError) as err:
        _dataset(**fields)
    assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(("value", "expect"), [
    (b"GIF89a broken", "dataset 'img': row 6 (image): image is unreadable (cannot identify image file); fix or remove it"),
    ("cmyk", "dataset 'img': row 6 (image): image mode 'CMYK' is not supported; convert it to RGB or L"),
    ("gone.png", "dataset 'img': row 6 (image): image file '"),
])
def test_bad_image_through_mosaic_run_one_line_same_on_dagster_step(value, expect: str, tmp_path: Path,
                                                                    tiny_model_dir: Path, home: Path,
                                                                    capsys: pytest.CaptureFixture[str]):
    from tests.support.runs import assert_no_dataset_artifact, assert_step_failed_with, error_line, run_cli
    from tests.support.models import fast_config

    path = _bad_png_rows(tmp_path, _cmyk() if value == "cmyk" else value)
    config = fast_config(tmp_path, tiny_model_dir, datasets=[{"name": "img", "path": str(path), "modality": "image"}])
    code, stderr = run_cli(config, capsys)
    assert code == 1
    line = error_line(stderr)
    assert line.startswith(expect), line
    assert_step_failed_with(config, "dataset", line)
    assert_no_dataset_artifact(tmp_path / "data", "img")
    assert not (tmp_path / "data" / "hidden").exists()


@pytest.mark.parametrize("name", ["digits_gemma3_4b.yaml", "digits_paligemma2.yaml"])
def test_real_model_image_examples_validate(name: str):
    from mosaic_dag.config import load_config
    from mosaic_dag.keys import dataset_keys

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / name)
    assert [k.key for k in dataset_keys(cfg)] == ["digits.image", "digits.en"]
    assert cfg.dataset("digits").token_selection == "image" and cfg.models[0].saes[0].origin == "registry"
