"""The tiny randomly initialised Gemma 3 model (seconds, not minutes), its data, and the one config factory."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WORDS = (
    "you are a the and to of in it is was for on with this that my your i we they hello world thank "
    "great stupid idiot lovely kind friend post comment idea day good bad hate love nice go away here "
    "bonjour merci le la les un une et est tu es danke du bist ein hola gracias eres muy"
).split()


def build_tiny_model(folder: Path, n_layers: int = 4, seed: int = 0) -> Path:
    """A Gemma 3 architecture with random weights and a word-level tokenizer, saved like any HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["_name_or_path"] = "tiny-gemma3"
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def write_csv_dataset(path: Path, n_per_class: int = 30) -> Path:
    import pandas as pd

    good = ["thank you my friend", "you are kind", "lovely day", "great post", "nice idea", "hello world"]
    bad = ["you are a stupid idiot", "go away idiot", "i hate your post", "stupid comment", "bad idea idiot"]
    rows = []
    for i in range(n_per_class):
        rows.append({"message": f"{good[i % len(good)]} {WORDS[i % 20]}", "tox": "ok"})
        rows.append({"message": f"{bad[i % len(bad)]} {WORDS[(i + 3) % 20]}", "tox": "toxic"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


TINY_SAE = {"origin": "train", "name": "btk", "architecture": "batchtopk", "width": 128, "k": 8,
            "training_tokens": 30000, "batch_size": 64}
TINY_CLASSIFICATION = {"poolings": ["mean"], "thresholds": [None], "top_n": [4], "classifiers": ["logistic"],
                       "tfidf": ["word"], "bootstrap": 50}


@functools.cache
def _empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its tables made, once per test process (making them takes seconds)."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="mosaic-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def mlflow_store(folder: Path) -> str:
    """Tracking URI of ``folder/mlflow.db``, a copy of an empty store where there is none yet (the run's first
    MLflow call then finds its tables made and skips the migration)."""
    path = folder / "mlflow.db"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_store(), path)
    return f"sqlite:///{path}"


def tiny_config(tmp_path: Path, model_dir: Path, layers: list[int] | None = None, *, fast: bool = False,
                datasets: list[dict] | None = None, **model_extra: object) -> Path:
    """A config file over the tiny model and a small CSV, with everything under tmp_path. ``fast``: a
    16-latent SAE and one cheap probe (a whole `mosaic run` in seconds); ``datasets`` replace the CSV."""
    import yaml

    csv = write_csv_dataset(tmp_path / "toy.csv")
    model_extra = {"saes": [dict(FAST_SAE) if fast else TINY_SAE], **model_extra}
    cfg = {
        "name": "tiny",
        "data_dir": str(tmp_path / "data"),
        "models": [{"name": "tiny", "id": str(model_dir), "layers": layers or [0, 2], "max_length": 16,
                    "batch_tokens": 64, **model_extra}],
        "classification": dict(FAST_CLASSIFICATION) if fast else TINY_CLASSIFICATION,
        "datasets": datasets if datasets is not None else [
            {"name": "toy", "path": str(csv), "text_field": "message", "label_field": "tox", "language": "en"}],
        "mlflow": {"tracking_uri": mlflow_store(tmp_path)},
        # a tiny random model gives no healthy SAE: the quality floors have their own tests
        "sae_quality": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Small enough that a full `mosaic run` on the tiny model takes seconds, not minutes.
FAST_SAE = {"origin": "train", "name": "s16", "width": 16, "k": 4, "training_tokens": 1000, "batch_size": 16}
FAST_CLASSIFICATION = {"poolings": ["mean"], "thresholds": [None], "top_n": [5], "classifiers": ["logistic"],
                       "k": [1], "tfidf": [], "bootstrap": 0}


def fast_config(tmp_path: Path, model_dir: Path, *, layers: list[int] | None = None,
                datasets: list[dict] | None = None, **model_extra: object) -> Path:
    """``tiny_config(fast=True)``: the preset the end-to-end reliability tests run."""
    return tiny_config(tmp_path, model_dir, layers=layers, fast=True, datasets=datasets, **model_extra)


def two_dataset_config(tmp_path: Path, model_dir: Path, train_on: list[str] | None, extra: bool = True) -> Path:
    """The fast preset at layer 1, its SAE named ``btk`` (target ``tiny.L1.btk``) and trained on ``train_on``,
    plus a second CSV dataset ``other`` when ``extra``."""
    import yaml

    path = fast_config(tmp_path, model_dir, layers=[1])
    cfg = yaml.safe_load(path.read_text())
    cfg["models"][0]["saes"] = [{**FAST_SAE, "name": "btk", **({"train_on": train_on} if train_on else {})}]
    if extra:
        other = write_csv_dataset(tmp_path / "other.csv", n_per_class=20)
        cfg["datasets"].append({"name": "other", "path": str(other), "text_field": "message", "label_field": "tox",
                                "language": "en"})
    path.write_text(yaml.safe_dump(cfg))
    return path
