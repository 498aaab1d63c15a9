"""Latent interpretation of the selected SAE probe: the planted latent comes first with the right sign,
frequency and class-mean difference; firing texts are the test texts where it is largest; the tree is drawn
with latent ids; nothing is chosen on test rows."""

from __future__ import annotations

import json

import numpy as np

from mosaic_dag.features.pooled import feature_name
from mosaic_dag.probes.interpret import interpret_partition, tree_figure
from tests.support.report_data import planted_codes, planted_runs


def test_selected_probe_latents_texts_and_tree() -> None:
    X, y, frame = planted_codes()
    runs = planted_runs(X, y)
    names = {0: "fine", 1: "toxic"}
    key = json.dumps([feature_name("sae", "mean", None), None])
    seen = []

    def matrix(k: str):
        seen.append(k)
        return X

    out = interpret_partition("m.L1.s toy.en", runs, matrix, frame, names, neuronpedia_id="gemma/6-res-16k", top=3)
    assert out is not None and seen == [key]
    best = max(runs, key=lambda r: r.result.validation_macro_f1)
    assert out.probe == best.spec.label
    toxic = out.latents[out.latents["class"] == "toxic"].iloc[0]
    assert toxic["latent"] == 3 and toxic["weight"] > 0 and toxic["class_mean_diff"] > 1
    fit = np.r_[np.arange(180), np.arange(180, 240)]
    assert toxic["activation_frequency"] == round(float((y[fit] == 1).mean()), 4)
    assert toxic["neuronpedia"] == "https://www.neuronpedia.org/gemma/6-res-16k/3"
    # firing texts: test rows only, largest pooled value of latent 3 first, all of class toxic
    ex = out.examples[3]
    test_ids = set(frame["id"].iloc[240:])
    assert {e["id"] for e in ex} <= test_ids and all(e["label"] == "toxic" for e in ex)
    values = [e["value"] for e in ex]
    assert values == sorted(values, reverse=True) and values[0] == X[240:, 3].toarray().max()
    page = out.html()
    assert "latent 3" in page and "neuronpedia.org/gemma/6-res-16k/3" in page and "data:image/png;base64," in page
    assert out.tree_png and "![tree](data:image/png;base64," in out.markdown()


def test_tree_is_drawn_with_latent_ids() -> None:
    X, y, _ = planted_codes()
    tree = planted_runs(X, y)[1]
    fig = tree_figure(tree.result, {0: "fine", 1: "toxic"}, tree.spec.label)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("latent 3" in t for t in texts) and any("toxic" in t for t in texts)
