"""mosaic_dag.sae (spec, loading, compat, encode, stats, codes_io): sparse encoding equals sae-lens's encode, compatibility checks, codes I/O, registry loading."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tests.support.sae import (
    D_IN,
    GS2_D_MODEL,
    GS2_WIDTH,
    WIDTH,
    FakeHubSae,
    make_batchtopk_inference_sae,
    make_sae,
    offline_hub,
    random_acts,
)

from mosaic_dag.errors import CacheError
from mosaic_dag.sae.codes_io import read_codes, write_codes
from mosaic_dag.sae.compat import SaeInfo, check_compatible, sae_info
from mosaic_dag.sae.encode import encode_sparse
from mosaic_dag.sae.loading import load_sae
from mosaic_dag.sae.spec import SaeCodesError, SaeLoadError, SaeMismatchError, SaeSpec
from mosaic_dag.sae.stats import encode_stats


def _reference(sae: object, acts: np.ndarray) -> np.ndarray:
    """What sae-lens itself returns for the whole array at once, rounded like mosaic stores it."""
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(acts.astype(np.float32)))  # type: ignore[attr-defined]
    return z.numpy().astype(np.float16).astype(np.float32)


def assert_codes_match(got: np.ndarray, ref: np.ndarray) -> None:
    """Codes equal sae.encode's up to float32 rounding of the fused encoder: after float16 storage a
    value may sit one float16 step (2**-10 relative) away, and a latent within ~1e-6 of its threshold
    may flip; anything more is a bug."""
    assert got.shape == ref.shape
    flips = (got != 0) != (ref != 0)
    assert flips.mean() <= 1e-4, f"{int(flips.sum())} latents switched on/off"
    both = (got != 0) & (ref != 0)
    np.testing.assert_allclose(got[both], ref[both], rtol=2e-3, atol=1e-6)
    assert (got == ref).mean() > 0.999


# ------------------------------------------------------------------------------------------
# encode_sparse
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "standard"])
def test_encode_sparse_equals_sae_encode(architecture: str) -> None:
    sae = make_sae(architecture)
    acts = random_acts(3000)
    codes = encode_sparse(sae, acts, chunk_tokens=700)  # several chunks, last one partial
    ref = _reference(sae, acts)
    assert sp.isspmatrix_csr(codes)
    assert codes.shape == (3000, WIDTH)
    assert_codes_match(codes.toarray(), ref)
    frac = codes.nnz / codes.shape[0] / WIDTH
    assert 0.01 < frac < 0.9, f"test SAE should be neither dead nor dense, active fraction {frac}"
    assert codes.has_canonical_format


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_fast_path_never_builds_the_dense_codes(monkeypatch: pytest.MonkeyPatch, architecture: str) -> None:
    """TopK / JumpReLU SAEs skip sae.encode's dense [tokens, d_sae] codes, with the same codes (masked rows empty)."""
    sae = make_sae(architecture)
    acts = random_acts(1500)
    mask = np.ones(1500, dtype=bool)
    mask[::7] = False
    ref = _reference(sae, acts)

    def dense_encode(_x: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"dense sae.encode was called for a {architecture} SAE")

    monkeypatch.setattr(sae, "encode", dense_encode)
    codes = encode_sparse(sae, acts, chunk_tokens=400, real_mask=mask)
    dense = codes.toarray()
    assert_codes_match(dense[mask], ref[mask])
    assert not dense[~mask].any()
    assert codes.has_canonical_format
    if architecture == "topk":
        assert np.all(codes.getnnz(axis=1)[mask] == 8)


def test_topk_rescaled_by_decoder_norm_keeps_sae_encode_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """TopK SAEs trained with rescale_acts_by_decoder_norm rank latents by pre * |W_dec row|: the fast path too."""
    sae = make_sae("topk")
    sae.cfg.rescale_acts_by_decoder_norm = True
    with torch.no_grad():  # decoder rows of very different norms, so the rescale changes the top k
        sae.W_dec.mul_(torch.linspace(0.1, 3.0, WIDTH)[:, None])
    acts = random_acts(900)
    ref = _reference(sae, acts)
    monkeypatch.setattr(sae, "encode", lambda _x: (_ for _ in ()).throw(AssertionError("dense encode")))
    got = encode_sparse(sae, acts, chunk_tokens=200).toarray()
    assert_codes_match(got, ref)
    seen: list[torch.Tensor] = []  # a hook on the pre-activations sees them before the rescale, as in sae-lens
    sae.hook_sae_acts_pre.add_hook(lambda z, hook: seen.append(z.clone()))
    try:
        assert_codes_match(encode_sparse(sae, acts, chunk_tokens=200).toarray(), ref)
    finally:
        sae.hook_sae_acts_pre.remove_hooks()
    x = torch.from_numpy(acts[:200].astype(np.float32))
    with torch.no_grad():
        first = next(z for z in seen if z.shape[0] == 200)  # (the encoder's own 3-row probe comes first)
        torch.testing.assert_close(first, sae.process_sae_in(x) @ sae.W_enc + sae.b_enc, rtol=1e-4, atol=1e-5)
    sae.cfg.rescale_acts_by_decoder_norm = False
    assert ((encode_sparse(sae, acts, chunk_tokens=200).toarray() != 0) != (ref != 0)).mean() > 0.01  # it matters


def test_topk_with_a_hook_goes_through_sae_encode() -> None:
    """A hook on the SAE's activations must see (and may change) the codes: then sae.encode runs."""
    sae = make_sae("topk")
    acts = random_acts(600)
    plain = encode_sparse(sae, acts, chunk_tokens=256).toarray()
    sae.hook_sae_acts_post.add_hook(lambda z, hook: z * 2)
    try:
        hooked = encode_sparse(sae, acts, chunk_tokens=256)
        np.testing.assert_array_equal(hooked.toarray(), _reference(sae, acts))
        np.testing.assert_array_equal(hooked.toarray(), plain * 2)
    finally:
        sae.hook_sae_acts_post.remove_hooks()


def test_encode_sparse_runs_in_the_sae_dtype() -> None:
    """An SAE loaded in bfloat16 encodes in bfloat16 (what sae.encode gives), float16-rounded."""
    sae = make_sae("jumprelu").to(torch.bfloat16)
    acts = random_acts(800)
    codes = encode_sparse(sae, acts, chunk_tokens=300)
    with torch.no_grad():
        ref = sae.encode(torch.from_numpy(acts).to(torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(codes.toarray(), ref.astype(np.float16).astype(np.float32))


def test_encode_sparse_batchtopk_inference_sae(tmp_path: Path) -> None:
    training_sae, sae = make_batchtopk_inference_sae(tmp_path)
    assert sae.cfg.architecture() == "jumprelu"  # sae-lens ships BatchTopK as a thresholded JumpReLU
    acts = random_acts(2000)
    codes = encode_sparse(sae, acts, chunk_tokens=512)
    assert_codes_match(codes.toarray(), _reference(sae, acts))
    assert codes.nnz > 0
    # The training SAE would choose top-k across the chunk, so codes would depend on chunk size.
    with pytest.raises(SaeCodesError, match="save_inference_model"):
        encode_sparse(training_sae, acts)


def test_encode_sparse_float16_input_and_values_are_float16_exact() -> None:
    sae = make_sae("jumprelu")
    acts16 = random_acts(1000).astype(np.float16)
    codes = encode_sparse(sae, acts16, chunk_tokens=300)
    assert_codes_match(codes.toarray(), _reference(sae, acts16))
    np.testing.assert_array_equal(codes.data.astype(np.float16).astype(codes.dtype), codes.data)
    assert not np.any(codes.data == 0)


def test_signed_sae_keeps_negative_codes() -> None:
    sae = make_sae("abstopk")
    acts = random_acts(1000)
    codes = encode_sparse(sae, acts, chunk_tokens=256)
    np.testing.assert_array_equal(codes.toarray(), _reference(sae, acts))
    assert (codes.data < 0).any() and (codes.data > 0).any()
    assert np.all(codes.getnnz(axis=1) == 8)
    info = sae_info(sae)
    assert info.signed
    assert not sae_info(make_sae("topk")).signed


def test_encode_sparse_real_mask_leaves_special_rows_empty() -> None:
    sae = make_sae("jumprelu")
    acts = random_acts(1000)
    mask = np.ones(1000, dtype=bool)
    mask[::10] = False  # e.g. BOS of each text
    mask[300:700] = False  # a whole chunk of padding
    codes = encode_sparse(sae, acts, chunk_tokens=256, real_mask=mask)
    dense = codes.toarray()
    ref = _reference(sae, acts)
    assert_codes_match(dense[mask], ref[mask])
    assert not dense[~mask].any()


def test_encode_sparse_rejects_wrong_width() -> None:
    sae = make_sae("jumprelu")
    with pytest.raises(SaeMismatchError, match=r"d_in=64.*d_model=32"):
        encode_sparse(sae, random_acts(10, d=32))


# ------------------------------------------------------------------------------------------
# encode_stats
# ------------------------------------------------------------------------------------------


def test_encode_stats_match_direct_computation() -> None:
    sae = make_sae("standard")
    with torch.no_grad():
        sae.b_enc[:16] = -100.0  # latents 0..15 can never fire
    acts = random_acts(2000) * 3 + 1
    mask = np.ones(2000, dtype=bool)
    mask[:50] = False
    acts[:50] = 1e4  # huge "BOS" rows must not count
    codes = encode_sparse(sae, acts, chunk_tokens=512, real_mask=mask)
    stats = encode_stats(sae, acts, codes, real_mask=mask, chunk_tokens=333)

    x = acts[mask].astype(np.float64)
    z = codes.toarray()[mask]
    with torch.no_grad():
        x_hat = sae.decode(torch.from_numpy(z)).double().numpy()
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert stats.n_tokens == mask.sum()
    assert stats.mean_l0 == pytest.approx((z != 0).sum(1).mean())
    assert stats.dead_fraction == pytest.approx(((z != 0).sum(0) == 0).mean())
    assert stats.dead_fraction >= 16 / WIDTH
    assert stats.explained_variance == pytest.approx(ev, rel=1e-6, abs=1e-9)
    # codes=None encodes on the fly and gives the same numbers
    again = encode_stats(sae, acts, None, real_mask=mask)
    assert (again.n_tokens, again.mean_l0, again.dead_fraction) == (stats.n_tokens, stats.mean_l0, stats.dead_fraction)
    assert again.explained_variance == pytest.approx(stats.explained_variance, rel=1e-9)


# ------------------------------------------------------------------------------------------
# sae_info / check_compatible
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook_name", "layer", "site"),
    [
        ("blocks.6.hook_resid_post", 6, "resid_post"),
        ("model.layers.6", 6, "resid_post"),
        ("model.layers.6.output", 6, "resid_post"),
        ("layer_6", 6, None),
        ("blocks.7.hook_resid_pre", 6, "resid_pre"),  # input of block 7 == output of block 6
        ("blocks.6.hook_mlp_out", 6, "mlp_out"),
    ],
)
def test_sae_info_reads_layer_from_hook_names(hook_name: str, layer: int, site: str | None) -> None:
    info = sae_info(make_sae("topk", hook_name=hook_name, model_name="google/gemma-3-270m"))
    assert (info.layer, info.site, info.hook_name) == (layer, site, hook_name)
    assert (info.d_in, info.width, info.architecture) == (D_IN, WIDTH, "topk")
    assert info.model_name == "google/gemma-3-270m"


def test_sae_info_uses_registry_path_hint_when_metadata_is_thin() -> None:
    info = sae_info(make_sae("jumprelu"), hint="resid_post/layer_6_width_16k_l0_medium")
    assert (info.layer, info.site) == (6, "resid_post")
    assert sae_info(make_sae("jumprelu")).layer is None


def _info(**kw: object) -> SaeInfo:
    base: dict[str, object] = dict(
        d_in=640, width=512, architecture="jumprelu", hook_name="blocks.6.hook_resid_post", layer=6,
        site="resid_post", model_name="google/gemma-3-270m", signed=False,
    )
    base.update(kw)
    return SaeInfo(**base)  # type: ignore[arg-type]


def test_check_compatible_accepts_loose_model_names() -> None:
    for name in ("google/gemma-3-270m", "gemma-3-270m", "bundled:gemma-3-270m", "Google/Gemma-3-270M"):
        check_compatible(_info(), name, 640, 6)
    check_compatible(_info(model_name=None, layer=None, site=None), "anything", 640, 3)


def test_check_compatible_d_in_mismatch_names_both_numbers() -> None:
    with pytest.raises(SaeMismatchError) as err:
        check_compatible(_info(d_in=2304), "google/gemma-3-270m", 640, 6)
    msg = str(err.value)
    assert "d_in=2304" in msg and "d_model=640" in msg and "google/gemma-3-270m" in msg
    assert "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_check_compatible_layer_mismatch() -> None:
    with pytest.raises(SaeMismatchError, match=r"layer=6.*layer=5"):
        check_compatible(_info(), "google/gemma-3-270m", 640, 5)


def test_check_compatible_model_and_site_mismatch() -> None:
    with pytest.raises(SaeMismatchError, match=r"gemma-2-2b.*gemma-3-270m"):
        check_compatible(_info(model_name="gemma-2-2b"), "google/gemma-3-270m", 640, 6)
    with pytest.raises(SaeMismatchError, match="gemma-3-270m-it"):
        check_compatible(_info(model_name="google/gemma-3-270m-it"), "google/gemma-3-270m", 640, 6)
    with pytest.raises(SaeMismatchError, match="mlp_out"):
        check_compatible(_info(site="mlp_out", hook_name="blocks.6.hook_mlp_out"), "google/gemma-3-270m", 640, 6)


def test_check_compatible_on_real_sae_objects() -> None:
    sae = make_sae("jumprelu", hook_name="blocks.6.hook_resid_post", model_name="google/gemma-3-270m")
    check_compatible(sae_info(sae), "gemma-3-270m", D_IN, 6)
    with pytest.raises(SaeMismatchError, match=r"d_in=64.*d_model=640"):
        check_compatible(sae_info(sae), "gemma-3-270m", 640, 6)
    with pytest.raises(SaeMismatchError, match="layer=6"):
        check_compatible(sae_info(sae), "gemma-3-270m", D_IN, 9)


# ------------------------------------------------------------------------------------------
# SaeSpec and local loading
# ------------------------------------------------------------------------------------------


def test_sae_spec_default_names_and_validation() -> None:
    assert SaeSpec(origin="registry", release="gemma-scope-2-270m-pt-res", sae_id="layer_5_width_16k_l0_medium").name == "gs2-16k-medium"
    assert SaeSpec(origin="registry", release="gemma-scope-2-270m-pt-res-all", sae_id="layer_6_width_262k_l0_small").name == "gs2-all-262k-small"
    assert SaeSpec(origin="train", architecture="batchtopk", width=4096).name == "local-btk4k"
    assert SaeSpec(origin="local", path="/data/saes/my sae").name == "local-my-sae"
    assert SaeSpec(origin="local", path="/x", name="mine").name == "mine"
    with pytest.raises(ValueError, match="release"):
        SaeSpec(origin="registry", release="gemma-scope-2-270m-pt-res")
    with pytest.raises(ValueError, match="path"):
        SaeSpec(origin="local")
    with pytest.raises(SaeLoadError, match="needs both"):  # one line, not pydantic's multi-line dump
        load_sae(release="gemma-scope-2-270m-pt-res")
    cfg_like = types.SimpleNamespace(origin="local", path="/x/y", name=None, release=None, sae_id=None, width=16)
    assert SaeSpec.model_validate(cfg_like, from_attributes=True).name == "local-y"


def test_load_sae_local_folder_roundtrip(tmp_path: Path) -> None:
    sae = make_sae("topk", hook_name="model.layers.3", model_name="google/gemma-3-270m")
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(SaeSpec(origin="local", path=str(tmp_path / "sae")))
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0)
    assert sae_info(loaded).layer == 3
    assert load_sae(path=tmp_path / "sae").cfg.d_sae == WIDTH
    with pytest.raises(SaeLoadError, match="cfg.json"):
        load_sae(SaeSpec(origin="local", path=str(tmp_path / "missing")))
    with pytest.raises(SaeLoadError, match="train_sae"):
        load_sae(SaeSpec(origin="train", architecture="batchtopk", width=64))


# ------------------------------------------------------------------------------------------
# Registry loading from an offline Hugging Face cache
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fake_gemma_scope_2",
    [
        ("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium"),
        ("gemma-scope-2-270m-pt-res-all", "layer_6_width_16k_l0_small"),
    ],
    indirect=True,
)
def test_load_registry_sae_from_offline_cache(fake_gemma_scope_2: FakeHubSae) -> None:
    fake = fake_gemma_scope_2
    sae = load_sae(SaeSpec(origin="registry", release=fake.release, sae_id=fake.sae_id))
    expected = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    state = sae.state_dict()
    for ours, theirs in expected.items():
        np.testing.assert_array_equal(state[ours].numpy(), fake.params[theirs])

    info = sae_info(sae)
    assert (info.d_in, info.width, info.architecture) == (GS2_D_MODEL, GS2_WIDTH, "jumprelu")
    assert (info.layer, info.site) == (fake.layer, "resid_post")
    assert info.model_name == "google/gemma-3-270m"
    if fake.sae_id == "layer_5_width_16k_l0_medium":
        assert info.neuronpedia_id == "gemma-3-270m/5-gemmascope-2-res-16k"
    check_compatible(info, "gemma-3-270m", GS2_D_MODEL, fake.layer)
    with pytest.raises(SaeMismatchError):
        check_compatible(info, "gemma-3-270m", GS2_D_MODEL, fake.layer + 1)

    acts = random_acts(200, d=GS2_D_MODEL)
    codes = encode_sparse(sae, acts)
    assert_codes_match(codes.toarray(), _reference(sae, acts))


def test_load_registry_sae_offline_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch, tmp_path / "empty" / "hub")
    with pytest.raises(SaeLoadError) as err:
        load_sae(release="gemma-scope-2-270m-pt-res", sae_id="layer_9_width_16k_l0_medium")
    msg = str(err.value)
    assert "\n" not in msg
    assert "offline" in msg.lower() or "HF_HUB_OFFLINE" in msg
    assert "origin: train" in msg and "local" in msg


def test_load_registry_unknown_release_or_id() -> None:
    with pytest.raises(SaeLoadError, match="not in the sae-lens"):
        load_sae(release="no-such-release", sae_id="x")
    with pytest.raises(SaeLoadError, match="layer_6_width_16k_l0_medium"):
        load_sae(release="gemma-scope-2-270m-pt-res", sae_id="layer_6_width_16k_l0_medium")


# ------------------------------------------------------------------------------------------
# Codes I/O
# ------------------------------------------------------------------------------------------


def _codes_fixture() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    codes = encode_sparse(make_sae("jumprelu"), random_acts(900))
    offsets = np.array([0, 10, 10, 400, 900], dtype=np.int64)  # includes an empty text
    real_mask = np.ones(900, dtype=bool)
    real_mask[offsets[:-1][np.diff(offsets) > 0]] = False
    rows = np.array([7, 3, 11, 42], dtype=np.int64)
    return codes, offsets, real_mask, rows


def test_codes_npz_roundtrip_exact(tmp_path: Path) -> None:
    codes, offsets, real_mask, rows = _codes_fixture()
    path = write_codes(tmp_path / "codes.npz", codes, offsets, real_mask, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npz"]  # no temp files left over
    back, off2, mask2, rows2 = read_codes(path)
    assert sp.isspmatrix_csr(back) and back.shape == codes.shape and back.dtype == codes.dtype
    np.testing.assert_array_equal(back.indptr, codes.indptr)
    np.testing.assert_array_equal(back.indices, codes.indices)
    np.testing.assert_array_equal(back.data, codes.data)
    np.testing.assert_array_equal(off2, offsets)
    np.testing.assert_array_equal(mask2, real_mask)
    np.testing.assert_array_equal(rows2, rows)
    assert off2.dtype == np.int64 and mask2.dtype == np.bool_
    with np.load(path, allow_pickle=False) as z:  # compact on disk, and readable without pickle
        assert z["data"].dtype == np.float16


def test_codes_roundtrip_keeps_values_float16_cannot_hold(tmp_path: Path) -> None:
    codes = sp.csr_matrix(np.array([[0.1, 0, 1e-9], [0, 70000.0, 0]], dtype=np.float64))
    write_codes(tmp_path / "c.npz", codes, np.array([0, 2]), np.ones(2, bool), np.array([0]))
    back = read_codes(tmp_path / "c.npz").codes
    np.testing.assert_array_equal(back.toarray(), codes.toarray())


def test_write_codes_rejects_inconsistent_inputs(tmp_path: Path) -> None:
    codes, offsets, real_mask, rows = _codes_fixture()
    with pytest.raises(SaeCodesError, match="offsets"):
        write_codes(tmp_path / "c.npz", codes, offsets[:-1], real_mask, rows[:-1])
    with pytest.raises(SaeCodesError, match="real_mask"):
        write_codes(tmp_path / "c.npz", codes, offsets, real_mask[:-1], rows)
    with pytest.raises(SaeCodesError, match="rows"):
        write_codes(tmp_path / "c.npz", codes, offsets, real_mask, rows[:2])
    assert not (tmp_path / "c.npz").exists()


def test_read_codes_corrupt_file_raises_cache_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CacheError, match="recomputed"):
        read_codes(bad)
    np.savez(tmp_path / "partial.npz", data=np.zeros(3))
    with pytest.raises(CacheError, match="lacks"):
        read_codes(tmp_path / "partial.npz")


def test_grouped_topk_equals_torch_topk() -> None:
    """Same values and latents as torch.topk, including rows whose top k crowd into one group."""
    from mosaic_dag.sae.encode import grouped_topk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2048, generator=g)
    x[0, :40] = 10 + torch.arange(40.0)  # all top 32 of row 0 in two adjacent groups
    x[1] = torch.arange(2048.0)  # top 32 = the last group
    x[2, ::64] = 50.0 + torch.arange(32.0)  # one winner per group, spread out
    for k in (1, 8, 32):
        v, i = grouped_topk(x, k)
        rv, ri = torch.topk(x, k, dim=1, sorted=False)
        assert torch.equal(torch.sort(i, dim=1).values, torch.sort(ri, dim=1).values)
        assert torch.equal(torch.sort(v, dim=1).values, torch.sort(rv, dim=1).values)
        assert torch.equal(torch.gather(x, 1, i), v)
    wide = torch.randn(20, 16384, generator=g)  # two levels at k = 32: groups of 64, then of 8
    wide[0, 5000:5040] = 10 + torch.arange(40.0)  # crowded into one group at both levels
    wide[1, ::512] = 50.0 + torch.arange(32.0)
    v, i = grouped_topk(wide, 32)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(torch.topk(wide, 32, 1).indices, 1).values)
    assert torch.equal(torch.gather(wide, 1, i), v)
    odd = torch.randn(5, 100, generator=g)  # width not a multiple of the group: plain torch.topk
    assert torch.equal(torch.sort(grouped_topk(odd, 4)[1], 1).values, torch.sort(torch.topk(odd, 4, 1).indices, 1).values)
