"""Interventions: a planted latent moves the probe's decisions and the model's output; an inert one moves neither."""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml

from mosaic_dag.evaluation.interventions import (
    LatentChoice,
    latent_intervention,
    model_reliance,
    probe_flips,
    reliance_table,
)
from mosaic_dag.probes.linear import fit_logistic
from mosaic_dag.probes.fit import predict
from tests.support.models import tiny_config

PLANTED, INERT, NOISE = 0, 1, 2
TEXTS = ["you are kind", "go away idiot", "lovely day my friend", "i hate your post", "great post", "stupid comment"]


class _Loaded:
    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)


def planted_sae(d_in: int = 64):
    """A 4-latent ReLU SAE: latent 0 fires (code 3) on every token with a big decoder row; latent 1 never fires."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.copy_(torch.tensor([3.0, -1.0, 0.5, -1.0]))
        sae.W_dec.copy_(torch.randn(4, d_in, generator=g))
        sae.W_dec[PLANTED] *= 2.0
    return sae


def test_planted_latent_moves_the_model_and_an_inert_one_moves_nothing(tiny_model_dir: Path):
    loaded, sae = _Loaded(tiny_model_dir), planted_sae()
    effects, fires, metric = model_reliance(loaded, sae, 1, TEXTS, [PLANTED, INERT], batch_size=4)
    assert metric == "kl_last_token"
    assert effects[PLANTED] > 1e-3 and fires[PLANTED] == 1.0
    assert effects[INERT] == 0.0 and fires[INERT] == 0.0
    choice, _, m2 = model_reliance(loaded, sae, 1, [f"is this toxic {t} answer" for t in TEXTS], [PLANTED, INERT],
                                   options=[" yes", " no"])
    assert m2 == "abs_delta_logprob" and choice[PLANTED] > 1e-3 and choice[INERT] == 0.0
    # scaling by 1 is the clean run up to float rounding: the error term keeps everything else as it was
    same, _, _ = model_reliance(loaded, sae, 1, TEXTS, [PLANTED], scale=1.0)
    assert same[PLANTED] < 1e-6 * effects[PLANTED] + 1e-9


def test_intervention_skips_bos_and_padding(tiny_model_dir: Path):
    from mosaic_dag.lm.extract import special_ids

    loaded, sae = _Loaded(tiny_model_dir), planted_sae()
    tok = loaded.tokenizer
    batch = tok(["you are kind", "go away"], return_tensors="pt", padding=True)
    n_real = int((batch["attention_mask"].sum() - 2))  # minus one BOS per text
    with latent_intervention(loaded.model, sae, 1, PLANTED, 0.0, special_ids(tok).tolist()) as counts, \
            torch.inference_mode():
        loaded.model(**batch)
    assert counts["tokens"] == n_real == counts["fired"]


def test_planted_latent_flips_the_probe_and_an_inert_one_never_does():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 60)
    X = np.zeros((120, 4), dtype=np.float32)
    X[:, PLANTED] = 2.0 * y + 0.3 * rng.random(120)  # the class signal lives in the planted latent
    X[:, NOISE] = rng.random(120)                     # INERT never fires
    X = sp.csr_matrix(X)
    probe = fit_logistic(X[:60], y[:60], X[60:80], y[60:80], X[80:], y[80:], n_boot=0)
    flips = probe_flips(lambda M: predict(probe.estimator, M)[0], X[80:], [PLANTED, INERT])
    assert flips[PLANTED] > 0.3 and flips[INERT] == 0.0
    table = reliance_table([LatentChoice("toxic", PLANTED, 1.0), LatentChoice("toxic", INERT, 0.0)], flips,
                           {PLANTED: 0.5, INERT: 0.0}, {PLANTED: 1.0, INERT: 0.0}, "kl_last_token",
                           min_flip_share=0.01, min_effect=0.01)
    assert table["verdict"].tolist() == ["probe and model rely on it", "neither relies on it"]
    assert reliance_table([LatentChoice("toxic", PLANTED, 1.0)], flips, {PLANTED: 0.0}, {PLANTED: 1.0}, "kl",
                          min_flip_share=0.01, min_effect=0.01)["verdict"].iloc[0] == "drives the probe, not the model"


def test_interventions_in_the_graph(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    from mosaic_dag.config import load_config
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.runner import run_experiment

    path = tiny_config(tmp_path, tiny_model_dir, layers=[1])
    raw = yaml.safe_load(path.read_text())
    raw["interventions"] = {"enabled": True, "top": 2, "texts": 6}
    path.write_text(yaml.safe_dump(raw))
    summary = run_experiment(path, progress=False, echo=lambda *_: None)
    step = next(s for s in summary.steps if s.asset == "interventions")
    assert step.metadata["refit_matches_probes"] is True  # the probe it explains is the selected one, refitted
    cfg = load_config(path)
    table = pd.read_parquet(cfg.data_path / "interventions" / "tiny.L1.btk" / "toy.en.parquet")
    selected = results_table(cfg).query("features == 'sae' and selected")["probe"].iloc[0]
    assert set(table["probe"]) == {selected} and set(table["class"]) == {"ok", "toxic"}
    assert len(table) <= 4 and table["probe_flip_share"].between(0, 1).all() and (table["model_effect"] >= 0).all()
    assert set(table["model_metric"]) == {"kl_last_token"}
    assert "Interventions" in (cfg.data_path / "report" / "index.md").read_text()
