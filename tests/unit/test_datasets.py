from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mosaic_dag.data import datasets as ds
from mosaic_dag.data.leakage import shared_texts
from mosaic_dag.config import DatasetConfig, SplitConfig
from mosaic_dag.errors import DatasetError
from tests.support.models import SHARED_DATA

SPLIT = SplitConfig()


def cfg(**kw) -> DatasetConfig:
    base = {"name": "t", "path": "x.csv", "text_field": "text", "label_field": "label", "language": "en"}
    return DatasetConfig(**{**base, **kw})


def frame(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"text number {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})


def test_demo_dataset_normalises_per_language():
    c = DatasetConfig(name="demo", path="bundled:demo", language=None, language_field="language",
                      languages=["en", "fr", "de", "es"])
    raw = ds.read_source(c)
    assert len(raw) >= 400 and set(raw["language"]) == {"en", "fr", "de", "es"}
    out = ds.normalise(raw, c, "fr", SPLIT)
    assert list(out.columns) == ds.COLUMNS
    assert set(out["language"]) == {"fr"} and set(out["split"]) == {"train", "validation", "test"}
    assert set(out["label_name"]) == {"toxic", "non_toxic"}
    assert shared_texts(out) == 0 and out["id"].is_unique
    # stratified: both classes in every split
    assert (out.groupby("split")["label"].nunique() == 2).all()
    again = ds.normalise(ds.read_source(c), c, "fr", SPLIT)
    pd.testing.assert_frame_equal(out, again)


def test_split_fractions_follow_config():
    out = ds.normalise(frame(400), cfg(), "en", SplitConfig(validation=0.1, test=0.2, seed=3))
    counts = out["split"].value_counts()
    assert counts["test"] == 80 and counts["validation"] == 40 and counts["train"] == 280


def test_source_splits_are_kept_and_validation_is_carved_from_train(tmp_path: Path):
    df = frame(60)
    df["split"] = ["train"] * 40 + ["test"] * 20
    df.to_csv(tmp_path / "d.csv", index=False)
    out = ds.load_dataset(cfg(path=str(tmp_path / "d.csv")), "en", SPLIT)
    assert (out["split"] == "test").sum() == 20
    assert out.loc[out["split"] == "test", "text"].tolist() == df["text"][40:].tolist()
    assert (out["split"] == "validation").sum() > 0


def test_folder_with_one_file_per_split(tmp_path: Path):
    folder = tmp_path / "f"
    folder.mkdir()
    frame(30).to_json(folder / "train.jsonl", orient="records", lines=True)
    frame(10).assign(text=lambda d: "val " + d["text"]).to_parquet(folder / "validation.parquet")
    frame(10).assign(text=lambda d: "test " + d["text"]).to_csv(folder / "test.tsv", sep="\t", index=False)
    out = ds.load_dataset(cfg(path=str(folder)), "en", SPLIT)
    assert out["split"].value_counts().to_dict() == {"train": 30, "validation": 10, "test": 10}


def test_class_from_file_names_and_a_cap_per_class_and_split(tmp_path: Path):
    folder = tmp_path / "f"
    folder.mkdir()
    sizes = {("harmful", "train"): 12, ("harmful", "test"): 30, ("harmless", "train"): 50, ("harmless", "val"): 9,
             ("harmless", "test"): 40, ("harmful", "val"): 4}
    for (cls, split), n in sizes.items():
        pd.DataFrame({"instruction": [f"{cls} {split} {i}" for i in range(n)], "category": None}).to_json(
            folder / f"{cls}_{split}.json", orient="records")
    c = cfg(path=str(folder), text_field="instruction", label_from="file", max_per_class=20)
    out = ds.load_dataset(c, "en", SPLIT)
    counts = out.groupby(["split", "label_name"]).size().to_dict()
    assert counts == {("test", "harmful"): 20, ("test", "harmless"): 20, ("train", "harmful"): 12,
                      ("train", "harmless"): 20, ("validation", "harmful"): 4, ("validation", "harmless"): 9}
    assert all(t.startswith(f"{n} ") for t, n in zip(out["text"], out["label_name"]))  # label from its own file
    pd.testing.assert_frame_equal(out, ds.load_dataset(c, "en", SPLIT))  # the draw is seeded
    with pytest.raises(DatasetError, match="label_from 'file' needs a folder"):
        ds.load_dataset(cfg(path=str(folder / "harmful_train.json"), text_field="instruction", label_from="file"),
                        "en", SPLIT)


def test_shared_texts_keep_their_test_copy_when_asked(tmp_path: Path):
    rows = [{"text": f"t{i}", "label": i % 2, "split": "train"} for i in range(20)]
    rows += [{"text": f"t{i}", "label": i % 2, "split": "test"} for i in range(3)]  # t0-t2 also in train
    rows += [{"text": f"v{i}", "label": i % 2, "split": "test"} for i in range(8)]
    rows += [{"text": "t5", "label": 1, "split": "validation"}, {"text": "v1", "label": 1, "split": "validation"},
             {"text": "w", "label": 0, "split": "validation"}]
    pd.DataFrame(rows).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DatasetError, match="drop_shared_texts: true"):
        ds.load_dataset(cfg(path=str(tmp_path / "s.csv")), "en", SPLIT)
    out = ds.load_dataset(cfg(path=str(tmp_path / "s.csv"), drop_shared_texts=True), "en", SPLIT)
    assert shared_texts(out) == 0
    by_split = {s: set(g["text"]) for s, g in out.groupby("split")}
    assert {"t0", "t1", "t2"} <= by_split["test"] and not {"t0", "t1", "t2", "t5"} & by_split["train"]
    assert by_split["validation"] == {"t5", "w"}  # v1 kept in test, t5 moved out of train into validation only
    assert len(out) == len(rows) - 5


def test_cap_per_class_before_our_own_split():
    raw = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [0] * 80 + [1] * 20})
    out = ds.normalise(raw, cfg(max_per_class=20), "en", SPLIT)
    assert out["label"].value_counts().to_dict() == {0: 20, 1: 20}


def test_string_labels_are_indexed_sorted():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["pos", "neg"] * 10})
    out = ds.normalise(df, cfg(), "en", SPLIT)
    assert dict(zip(out["label_name"], out["label"])) == {"neg": 0, "pos": 1}


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.rename(columns={"text": "body"}), "text_field 'text' is not a column"),
        (lambda d: d.rename(columns={"label": "y"}), "label_field 'label' is not a column"),
        (lambda d: d.assign(text=["  "] + d["text"].tolist()[1:]), "empty or whitespace"),
        (lambda d: d.assign(label=[np.nan] + d["label"].tolist()[1:]), "label_field 'label' is empty"),
        (lambda d: d.assign(label=0), "single class"),
        (lambda d: d.assign(label=["a"] + d["label"].tolist()[1:]), "mixes integer and text labels"),
        (lambda d: d.assign(label=["pos"] + [str(v) for v in d["label"].tolist()[1:]]), "mixes integer and text labels"),
        (lambda d: d.assign(label=[0.5, 1.5] * (len(d) // 2)), "not a whole class id (0.5 in row 0)"),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(mutate, field):
    with pytest.raises(DatasetError) as info:
        ds.normalise(mutate(frame()), cfg(), "en", SPLIT)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_missing_path_and_unknown_type(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        ds.load_dataset(cfg(path=str(tmp_path / "none.csv")), "en", SPLIT)
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        ds.load_dataset(cfg(path=str(tmp_path / "d.xlsx")), "en", SPLIT)


def test_unknown_hub_dataset_offline(monkeypatch: pytest.MonkeyPatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variable once, at import: set what they read, or this test goes online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="hf_name 'no-such-org/no-such-dataset' could not be loaded"):
        ds.load_dataset(DatasetConfig(name="x", hf_name="no-such-org/no-such-dataset"), "en", SPLIT)


def test_content_hash_changes_with_texts():
    a = ds.normalise(frame(), cfg(), "en", SPLIT)
    b = a.copy()
    b.loc[0, "text"] = "changed"
    assert ds.content_hash(a) == ds.content_hash(a.copy()) != ds.content_hash(b)


def test_real_multilingual_text_line_folder():
    folder = SHARED_DATA / "tweet_sentiment_multilingual" / "spanish"
    if not folder.exists():
        pytest.skip(f"shared data not found at {folder} (only present on project machines)")
    out = ds.load_dataset(cfg(path=str(folder), language="es", label_names={0: "negative", 1: "neutral", 2: "positive"}),
                          "es", SPLIT)
    assert out["split"].value_counts().to_dict() == {"train": 1839, "test": 870, "validation": 324}
    assert set(out["label_name"]) == {"negative", "neutral", "positive"}


def test_semicolon_csv_with_a_byte_order_mark_is_read(tmp_path: Path):
    """Excel's "CSV UTF-8" in a ';' locale: BOM + semicolons. Read with that delimiter, not one odd column."""
    rows = "".join(f"text number {i} here;{i % 2}\n" for i in range(40))
    (tmp_path / "semi.csv").write_bytes("\ufefftext;label\n".encode() + rows.encode())
    out = ds.load_dataset(DatasetConfig(name="semi", path=str(tmp_path / "semi.csv")), "en", SPLIT)
    assert len(out) == 40 and sorted(out["label_name"].unique()) == ["0", "1"]
    assert out["text"].iloc[0].startswith("text number")


def test_shared_texts_are_refused_unless_allowed():
    df = frame()
    df["split"] = ["train"] * (len(df) - 4) + ["test"] * 4
    df.loc[df.index[-1], "text"] = df["text"].iloc[0]  # one test text is also a train text
    with pytest.raises(DatasetError, match=r"1 texts are in more than one split .* allow_shared_texts: true"):
        ds.normalise(df.rename(columns={"split": "__split"}), cfg(), "en", SPLIT)
    kept = ds.normalise(df.rename(columns={"split": "__split"}), cfg().model_copy(update={"allow_shared_texts": True}),
                        "en", SPLIT)
    assert shared_texts(kept) == 1


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REAL_EXAMPLES = {  # example config -> (dataset, the classes it must read, rows it must keep)
    "davidson_offensive.yaml": ("davidson", {"hate", "offensive", "neither"}, 4000),
    "jailbreak.yaml": ("jailbreak", {"jailbreak", "benign"}, 1306 - 9),  # 9 train copies of 8 test prompts dropped
    "refusal.yaml": ("refusal", {"harmful", "harmless"}, 871 + 3 * 2000),
    "sentiment_8lang.yaml": ("sentiment", {"negative", "neutral", "positive"}, 600),
}


@pytest.mark.parametrize("name", sorted(REAL_EXAMPLES))
def test_real_data_example_configs_read_their_shared_data(name: str):
    from mosaic_dag.config import load_config

    cfg = load_config(EXAMPLES / name)
    dataset, classes, rows = REAL_EXAMPLES[name]
    d = cfg.dataset(dataset)
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present on project machines)")
    language = (d.languages or list(d.paths or {}) or [d.language])[0]
    out = ds.load_dataset(d, language, cfg.split, base=EXAMPLES)
    assert set(out["label_name"]) == classes
    assert len(out) == rows
    assert shared_texts(out) == 0
    for split in ("train", "validation", "test"):
        assert set(out.loc[out["split"] == split, "label_name"]) == classes
