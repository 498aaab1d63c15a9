"""Shared helpers for the SAE tests (imported explicitly; pytest does not auto-load this file).

Small random SAEs are built with sae-lens's own config classes, and a fake Hugging Face cache is laid
out like a real download of ``google/gemma-scope-2-270m-pt`` (blobs + snapshot symlinks + refs/main).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

D_IN = 64
WIDTH = 256

GS2_REPO = "google/gemma-scope-2-270m-pt"
GS2_D_MODEL = 640  # gemma-3-270m hidden size; the fake SAE must match it to be believable
GS2_WIDTH = 512  # small on purpose: the loader reads the width from the tensors


def make_sae(architecture: str, d_in: int = D_IN, width: int = WIDTH, seed: int = 0, **metadata: Any) -> Any:
    """A small random inference SAE with a reasonable fraction of latents active on N(0, 1) inputs."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes import AbsTopKSAE, AbsTopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(**metadata)
    if architecture == "jumprelu":
        sae: Any = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=width, metadata=meta))
    elif architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=width, k=8, metadata=meta))
    elif architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=width, metadata=meta))
    elif architecture == "abstopk":
        sae = AbsTopKSAE(AbsTopKSAEConfig(d_in=d_in, d_sae=width, k=8, metadata=meta))
    else:
        raise ValueError(architecture)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)  # 0.2..1.0: ~10-40% active
            elif name.startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return sae


def make_batchtopk_inference_sae(tmp_path: Path, k: float = 8.0, seed: int = 0) -> Any:
    """A BatchTopK SAE as sae-lens ships it for inference: saved, then reloaded (as JumpReLU)."""
    from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=k))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(WIDTH) * 0.05)
        sae.topk_threshold.fill_(0.01)  # the learned global threshold becomes the JumpReLU threshold
    folder = tmp_path / "btk"
    sae.save_inference_model(folder)
    return sae, SAE.load_from_disk(str(folder))


def random_acts(n: int = 3000, d: int = D_IN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def low_rank_acts(n: int = 20_000, d: int = D_IN, rank: int = 8, seed: int = 0, scale: float = 30.0) -> np.ndarray:
    """Sparse, low-rank, large-norm data (like a residual stream): an SAE can explain most of it."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    coef = rng.standard_normal((n, rank)) * (rng.random((n, rank)) < 0.4)
    return (scale * coef @ basis + 0.05 * scale * rng.standard_normal((n, d))).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Fake Hugging Face cache for the registry path
# ------------------------------------------------------------------------------------------


@dataclass
class FakeHubSae:
    cache_dir: Path
    release: str
    sae_id: str
    layer: int
    params: dict[str, np.ndarray]  # exactly what was written, Gemma Scope naming (w_enc, ...)


def _write_blob(repo_dir: Path, snapshot: Path, rel_path: str, payload: bytes) -> None:
    """Store like huggingface_hub does: content in blobs/<hash>, a relative symlink in the snapshot."""
    digest = hashlib.sha256(payload).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(payload)
    link = snapshot / rel_path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def write_gemma_scope_2_entry(cache_dir: Path, folder: str, layer: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``<folder>/params.safetensors`` + ``config.json`` of the Gemma Scope 2 270M repo into a hub cache."""
    from safetensors.numpy import save as save_numpy

    rng = np.random.default_rng(seed)
    params = {
        "w_enc": (rng.standard_normal((GS2_D_MODEL, GS2_WIDTH)) * 0.05).astype(np.float32),
        "w_dec": (rng.standard_normal((GS2_WIDTH, GS2_D_MODEL)) * 0.05).astype(np.float32),
        "b_enc": (rng.standard_normal(GS2_WIDTH) * 0.01).astype(np.float32),
        "b_dec": (rng.standard_normal(GS2_D_MODEL) * 0.01).astype(np.float32),
        "threshold": (rng.random(GS2_WIDTH) * 0.5 + 0.1).astype(np.float32),
    }
    config = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": f"model.layers.{layer}.output",
        "width": GS2_WIDTH,
    }
    repo_dir = cache_dir / ("models--" + GS2_REPO.replace("/", "--"))
    commit = hashlib.sha1(f"{GS2_REPO}@fake".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    _write_blob(repo_dir, snapshot, f"{folder}/params.safetensors", save_numpy(params))
    _write_blob(repo_dir, snapshot, f"{folder}/config.json", json.dumps(config).encode())
    return params


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Point huggingface_hub at ``cache_dir`` and forbid network use, as HF_HUB_OFFLINE=1 would.

    huggingface_hub reads these variables once at import, so its constants module is patched too.
    """
    from huggingface_hub import constants

    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(cache_dir.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(cache_dir.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_gemma_scope_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[FakeHubSae]:
    """An offline hub cache holding one Gemma Scope 2 270M residual SAE (param: (release, sae_id))."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sae_id = getattr(request, "param", ("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium"))
    lookup = get_pretrained_saes_directory()[release]
    assert lookup.repo_id == GS2_REPO
    folder = lookup.saes_map[sae_id]  # e.g. resid_post/layer_5_width_16k_l0_medium
    layer = int(sae_id.split("_")[1])
    cache_dir = tmp_path / "hf_home" / "hub"
    params = write_gemma_scope_2_entry(cache_dir, folder, layer)
    offline_hub(monkeypatch, cache_dir)
    yield FakeHubSae(cache_dir=cache_dir, release=release, sae_id=sae_id, layer=layer, params=params)
