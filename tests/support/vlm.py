"""Tiny randomly initialised vision-language models (Gemma 3 multimodal, PaliGemma) saved like hub models.

Seconds to build: a 2-block SigLIP vision tower on 32x32 images (4 image tokens) in front of the tiny
Gemma 3 text model of ``conftest.build_tiny_model``, with a word-level tokenizer that has Gemma 3's image
tokens (``<start_of_image>``, ``<end_of_image>`` and the image soft token the processor expands).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support.models import WORDS

VLM_WORDS = WORDS + ("handwritten digit number zero one two three four five six seven eight nine "
                     "picture image photo drawing of an caption en what").split()
IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _tokenizer(extra_special: list[str], named: dict[str, str]):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in extra_special + VLM_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=named)
    return fast, vocab


def _text_config(vocab_size: int, n_layers: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def _vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)


def _name(folder: Path, name: str) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["_name_or_path"] = name
    (folder / "config.json").write_text(json.dumps(meta))


def gemma3_tokenizer_with_image_token(source: Path, folder: Path):
    """Gemma 3's own tokenizer (the bundled model's) plus the image soft token, named as on the Hub.

    It has ``<start_of_image>``/``<end_of_image>`` but not ``<image_soft_token>``; added, it gets id 262144,
    the real Gemma 3 multimodal models' ``image_token_index``.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image_soft_token>", special=True, normalized=False)]})
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    meta = json.loads((folder / "tokenizer_config.json").read_text())
    meta["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(meta))
    tok = AutoTokenizer.from_pretrained(folder)
    return tok, tok.get_vocab()


def build_tiny_vlm(folder: Path, n_layers: int = 4, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """Gemma3ForConditionalGeneration + Gemma3Processor (4 image tokens per image).

    ``tokenizer_from``: a folder with Gemma 3's real tokenizer (else a word-level one with the image tokens).
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    if tokenizer_from is not None:
        fast, vocab = gemma3_tokenizer_with_image_token(tokenizer_from, folder / "tokenizer-src")
    else:
        fast, vocab = _tokenizer(IMAGE_TOKENS, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                "image_token": "<image_soft_token>"})
    torch.manual_seed(seed)
    cfg = Gemma3Config(text_config=_text_config(len(vocab), n_layers).to_dict(),
                       vision_config=_vision_config().to_dict(), mm_tokens_per_image=4,
                       boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                       image_token_index=vocab["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(cfg).eval()
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=fast, image_seq_length=4)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _name(folder, "tiny-gemma3-vlm")
    return folder


def build_tiny_paligemma(folder: Path, n_layers: int = 4, seed: int = 0) -> Path:
    """PaliGemmaForConditionalGeneration + PaliGemmaProcessor over a tiny Gemma text model."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor)

    fast, vocab = _tokenizer(["<image>"], {"image_token": "<image>"})
    torch.manual_seed(seed)
    text = GemmaConfig(vocab_size=len(vocab) + 1200, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = _vision_config()
    vision.projection_dim = 64
    cfg = PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          image_token_index=vocab["<image>"], projection_dim=64, hidden_size=64)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=fast)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _name(folder, "tiny-paligemma")
    return folder
