"""mosaic_dag.sae.training: sae-lens's trainer fed from an activation array, saved in sae-lens format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.support.sae import D_IN, low_rank_acts
from safetensors.torch import load_file

from mosaic_dag.sae.compat import check_compatible, sae_info
from mosaic_dag.sae.loading import load_sae
from mosaic_dag.sae.training import METRICS_FILENAME, SaeTrainingError, read_training_metrics, train_sae

HOOK = "model.layers.6"
MODEL = "google/gemma-3-270m"
FAST = dict(width=256, k=8, training_tokens=20_000, lr=4e-3, batch_size=256)


def _explained_variance(sae: object, acts: np.ndarray) -> float:
    """Computed straight from sae-lens's encode/decode, independent of mosaic's encode_stats."""
    x = torch.from_numpy(acts)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))  # type: ignore[attr-defined]
    x64, xh64 = x.double(), x_hat.double()
    return float(1 - ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())


@pytest.fixture(scope="module")
def acts() -> np.ndarray:
    return low_rank_acts(20_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, acts: np.ndarray) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("train") / "btk"
    res = train_sae(acts, hook_name=HOOK, model_name=MODEL, out_dir=out, seed=0, **FAST)  # type: ignore[arg-type]
    return res.path, res.metrics


def test_batchtopk_learns_and_loads_with_sae_lens(trained: tuple[Path, dict[str, object]], acts: np.ndarray) -> None:
    from sae_lens import SAE

    path, metrics = trained
    sae = SAE.load_from_disk(str(path))
    assert sae.cfg.architecture() == "jumprelu"  # BatchTopK is saved as a thresholded JumpReLU
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, 256)
    ev = _explained_variance(sae, acts[:5000])
    assert ev > 0.8, f"SAE should reconstruct low-rank data well, explained variance {ev:.3f}"
    assert metrics["explained_variance"] == pytest.approx(ev, abs=0.05)
    assert 2 <= float(metrics["l0"]) <= 40  # type: ignore[arg-type]
    assert 0.0 <= float(metrics["dead_fraction"]) < 1.0  # type: ignore[arg-type]
    assert metrics["training_tokens"] == 20_000 // 256 * 256
    assert float(metrics["wall_time_s"]) > 0  # type: ignore[arg-type]
    assert read_training_metrics(path) == json.loads((path / METRICS_FILENAME).read_text())


def test_trained_sae_metadata_drives_compatibility(trained: tuple[Path, dict[str, object]]) -> None:
    path, _ = trained
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == MODEL and cfg["metadata"]["hook_name"] == HOOK
    info = sae_info(load_sae(path=path))
    assert (info.layer, info.site, info.model_name) == (6, "resid_post", MODEL)
    check_compatible(info, "gemma-3-270m", D_IN, 6)
    with pytest.raises(ValueError, match="layer=6"):
        check_compatible(info, "gemma-3-270m", D_IN, 7)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # temp dir was renamed, not left


def test_same_seed_same_weights_other_seed_differs(
    trained: tuple[Path, dict[str, object]], acts: np.ndarray, tmp_path: Path
) -> None:
    path, _ = trained
    before = torch.get_rng_state()
    again = train_sae(acts, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "again", seed=0, **FAST)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), before), "training must not disturb the caller's torch RNG"
    other = train_sae(acts, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "other", seed=1, **FAST)  # type: ignore[arg-type]
    w0 = load_file(path / "sae_weights.safetensors")
    w1 = load_file(again.path / "sae_weights.safetensors")
    w2 = load_file(other.path / "sae_weights.safetensors")
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert not torch.equal(w0["W_enc"], w2["W_enc"])


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard"])
def test_other_architectures_train_and_reload(architecture: str, acts: np.ndarray, tmp_path: Path) -> None:
    res = train_sae(
        acts, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / architecture, architecture=architecture, seed=0, **FAST  # type: ignore[arg-type]
    )
    sae = load_sae(path=res.path)
    assert sae.cfg.architecture() == architecture
    assert _explained_variance(sae, acts[:5000]) > 0.5


def test_real_mask_keeps_special_tokens_out_of_training(acts: np.ndarray, tmp_path: Path) -> None:
    spiked = acts.copy()
    bos = np.arange(0, spiked.shape[0], 50)
    spiked[bos] = 5000.0  # BOS-like rows with a huge norm
    mask = np.ones(spiked.shape[0], dtype=bool)
    mask[bos] = False
    res = train_sae(spiked, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "m", real_mask=mask, seed=0, **FAST)  # type: ignore[arg-type]
    sae = load_sae(path=res.path)
    assert _explained_variance(sae, spiked[mask][:5000]) > 0.8
    assert res.metrics["available_tokens"] == int(mask.sum())


def test_train_sae_rejects_bad_inputs(acts: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(SaeTrainingError, match="k <= width"):
        train_sae(acts, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "a", training_tokens=1000, width=8, k=16)
    with pytest.raises(SaeTrainingError, match="layer"):
        train_sae(acts, hook_name="resid", model_name=MODEL, out_dir=tmp_path / "b", training_tokens=1000, batch_size=256)
    with pytest.raises(SaeTrainingError, match="batch_size"):
        train_sae(acts[:100], hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "c", training_tokens=1000, batch_size=256)
    bad = acts[:2000].copy()
    bad[3, 3] = np.nan
    with pytest.raises(SaeTrainingError, match="NaN"):
        train_sae(bad, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "d", training_tokens=1000, batch_size=256)
    assert not any(tmp_path.iterdir())


def _offset_acts(n: int, seed: int) -> np.ndarray:
    """Low-rank data plus one large shared direction, as in a residual stream (its mean dwarfs the rest)."""
    offset = 150.0 * np.random.default_rng(5).standard_normal(D_IN).astype(np.float32)
    return low_rank_acts(n, seed=seed) + offset


def test_recipe_reports_held_out_health_and_a_training_curve(tmp_path: Path) -> None:
    train, held = _offset_acts(6000, seed=1), _offset_acts(2000, seed=2)
    kw = dict(width=256, k=8, training_tokens=30_000, lr=4e-3, batch_size=256, seed=0)
    on = train_sae(train, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "on", held_out=held, **kw)  # type: ignore[arg-type]
    off = train_sae(train, hook_name=HOOK, model_name=MODEL, out_dir=tmp_path / "off", held_out=held,
                    init_b_dec=False, **kw)  # type: ignore[arg-type]
    m = on.metrics
    assert m["eval_on"] == "held_out" and m["eval_tokens"] == 2000
    sae = load_sae(path=on.path)
    assert m["explained_variance"] == pytest.approx(_explained_variance(sae, held), abs=0.02)
    # starting b_dec at the data mean keeps latents alive that the shared direction would starve
    assert m["dead_fraction"] < off.metrics["dead_fraction"]
    assert m["explained_variance"] > off.metrics["explained_variance"]
    curve = m["curve"]
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and len(curve) >= 20 and steps[-1] == m["steps"] - 1
    assert {"loss", "l0", "dead_fraction", "lr"} <= set(curve[0])
    lrs = [p["lr"] for p in curve]
    assert lrs[0] < max(lrs) == pytest.approx(4e-3) and lrs[-1] < 0.2 * max(lrs)  # warm-up, then decay
    assert m["epochs"] == pytest.approx(m["training_tokens"] / 6000, abs=0.01)
    json.dumps(m)  # the metrics file stays plain JSON
