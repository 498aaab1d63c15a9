"""SAE quality on task texts: loss recovered by splicing the reconstruction, and the floors check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_dag.config import ModelConfig
from mosaic_dag.lm.models import load_model
from mosaic_dag.sae.quality import SaeFloors, check_quality, measure_quality
from tests.support.models import WORDS
from tests.support.sae import make_sae

TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(24)]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = ModelConfig(name="tiny", id=str(tiny_model_dir), layers=[1], dtype="float32")
    return load_model(cfg, tmp_path_factory.mktemp("models"))


def _exact_sae(d: int):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, a perfect reconstruction."""
    sae = make_sae("standard", d_in=d, width=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_perfect_sae_recovers_all_loss_and_clean_ce_is_the_models_own(loaded) -> None:
    q = measure_quality(loaded, _exact_sae(64), 1, TEXTS, max_length=16, batch_tokens=64)
    assert q.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert q.loss_recovered == pytest.approx(1.0, abs=1e-4) and abs(q.ce_increase) < 1e-4
    assert q.ce_zero > q.ce_clean  # deleting the layer's output hurts this model
    assert q.mean_l0 > 0 and q.n_loss_tokens == sum(len(t.split()) for t in TEXTS)  # BOS is never a target
    # clean CE equals Hugging Face's own loss over the same texts (one text at a time, no padding)
    tok = loaded.tokenizer
    total = n = 0
    with torch.inference_mode():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            total += float(loaded.model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert q.ce_clean == pytest.approx(total / n, rel=1e-4)
    ok = check_quality(q, SaeFloors(min_explained_variance=0.99, min_loss_recovered=0.99, max_dead_fraction=0.5))
    assert ok.passed and "meets its floors" in ok.line


def test_deliberately_bad_sae_is_stopped_with_the_number_and_floor(loaded) -> None:
    zero_decoder = _exact_sae(64)
    with torch.no_grad():
        zero_decoder.W_dec.zero_()
    q0 = measure_quality(loaded, zero_decoder, 1, TEXTS, max_length=16, batch_tokens=64)
    assert q0.loss_recovered == pytest.approx(0.0, abs=1e-6)  # reconstruction 0 == zero ablation
    bad = make_sae("standard", d_in=64, width=256, seed=3)
    q = measure_quality(loaded, bad, 1, TEXTS, max_length=16, batch_tokens=64)
    assert q.explained_variance < 0.5 and q.loss_recovered < 0.5
    res = check_quality(q, SaeFloors(min_explained_variance=0.7, min_loss_recovered=0.8), name="bad")
    assert not res.passed
    assert res.line.startswith("sae bad: explained_variance ")
    assert "(must be >= 0.7)" in res.line and "loss_recovered" in res.line and "(must be >= 0.8)" in res.line
    # a floor that is switched off is not checked; L0 and dead-fraction limits name their side
    assert check_quality(q, SaeFloors(min_explained_variance=None, min_loss_recovered=None)).passed
    low = check_quality(q, SaeFloors(min_explained_variance=None, min_loss_recovered=None, max_l0=q.mean_l0 / 2,
                                     max_dead_fraction=-1.0))
    assert "mean_l0" in low.line and "(must be <=" in low.line and "dead_fraction" in low.line


def test_padding_does_not_change_the_losses(loaded) -> None:
    sae = make_sae("standard", d_in=64, width=128, seed=1)
    one = measure_quality(loaded, sae, 2, TEXTS, max_length=16, batch_tokens=16)   # ~one text a batch
    many = measure_quality(loaded, sae, 2, TEXTS, max_length=16, batch_tokens=256)  # padded batches
    for field in ("ce_clean", "ce_sae", "ce_zero", "explained_variance", "mean_l0"):
        assert getattr(one, field) == pytest.approx(getattr(many, field), rel=1e-4), field
    # undefined (NaN), not a made-up number, where zero ablation does not hurt (this random layer)
    assert np.isnan(one.loss_recovered) == (one.ce_zero <= one.ce_clean)


def test_cached_quality_written_as_d_sae_reads_back_as_width(tmp_path: Path) -> None:
    """A measurement cached before ``d_sae`` was named ``width`` is still a cache hit, with no forward pass."""
    import json
    from types import SimpleNamespace

    from mosaic_dag.keys import TargetKey
    from mosaic_dag.paths import quality_file
    from mosaic_dag.sae.quality import SaeQuality, partition_quality

    cfg = SimpleNamespace(data_path=tmp_path, sae_quality=SimpleNamespace(texts=8))
    target = TargetKey("tiny", 1, "btk")
    manifest = {"sae_identity": "trained:x", "hidden_cache": "/h"}
    path = quality_file(cfg, target, "d", "en", {"sae": "trained:x", "hidden": "/h", "texts": 8})  # type: ignore[arg-type]
    old = {"n_tokens": 10, "d_sae": 128, "mean_l0": 3.0, "dead_fraction": 0.1, "explained_variance": 0.8,
           "ce_clean": 1.0, "ce_sae": 1.2, "ce_zero": 2.0, "ce_increase": 0.2, "loss_recovered": 0.8, "n_loss_tokens": 9}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    q = partition_quality(cfg, target, "d", "en", None, manifest, None, None)  # no model, SAE or rows: cache only
    assert isinstance(q, SaeQuality) and q.width == 128 and q.mean_l0 == 3.0 and q.n_loss_tokens == 9
