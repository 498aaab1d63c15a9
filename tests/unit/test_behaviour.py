"""Behaviour labels: exact option scores, deterministic labels, judges, held-out scoring."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mosaic_dag.data.behaviour import (
    BEHAVIOUR_COLUMNS,
    KeywordJudge,
    ModelJudge,
    behaviour_labels,
    generate_replies,
    multiple_choice_labels,
)
from mosaic_dag.config import SplitConfig
from mosaic_dag.data.splits import assign_splits
from mosaic_dag.lm.scoring import build_prompts, option_logprobs
from mosaic_dag.probes.linear import fit_logistic
from tests.support.models import WORDS


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS[:40], size=int(rng.integers(2, 7)))) for _ in range(n)]


def test_option_logprobs_match_a_manual_forward_pass(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompts = ["you are a", "hello world this is my post and"]
    options = [["stupid idiot", "friend"], ["great"]]
    got = option_logprobs(model, tok, prompts, options, batch_size=2)
    assert got.shape == (2, 2) and np.isnan(got[1, 1])
    # manual: BOS + prompt, then the option's tokens; sum log p(token | everything before it)
    p_ids = tok(prompts[0])["input_ids"]
    o_ids = tok("stupid idiot", add_special_tokens=False)["input_ids"]
    assert p_ids[0] == tok.bos_token_id and len(o_ids) == 2
    ids = torch.tensor([p_ids + o_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    manual = sum(float(logp[len(p_ids) - 1 + t, o_ids[t]]) for t in range(len(o_ids)))
    assert got[0, 0] == pytest.approx(manual, abs=1e-4)
    assert got[0, 0] < 0 and got[0, 1] < 0
    # batching and padding do not change scores
    one_by_one = option_logprobs(model, tok, prompts, options, batch_size=1)
    np.testing.assert_allclose(got, one_by_one, atol=1e-4)


def test_option_errors_are_one_line(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    with pytest.raises(ValueError, match="option lists"):
        option_logprobs(model, tok, ["a"], [["x"], ["y"]])
    with pytest.raises(ValueError, match=r"options\[0\]: is empty"):
        option_logprobs(model, tok, ["a"], [[]])
    with pytest.raises(ValueError, match=r"answers\[0\]"):
        multiple_choice_labels(model, tok, ["you are"], [["good", "bad"]], [2])


def test_multiple_choice_picks_the_highest_scoring_option(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompts = _texts(6)
    options = [["good", "bad", "kind"]] * 6
    scores = option_logprobs(model, tok, prompts, options)
    pred, correct = multiple_choice_labels(model, tok, prompts, options, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(pred, scores.argmax(axis=1))
    np.testing.assert_array_equal(correct, pred == np.array([0, 1, 2, 0, 1, 2]))
    assert correct.dtype == np.bool_


def test_generation_is_greedy_deterministic_and_batch_invariant(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompts = ["you are a", "hello world this is my post and you are a stupid idiot", "go away"]
    a = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=3)
    b = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert a == b and len(a) == 3 and all(isinstance(r, str) and r for r in a)
    assert tok.padding_side == "right"  # the caller's tokenizer is not mutated
    # a model whose own generation config samples is still decoded greedily
    saved = model.generation_config.do_sample, model.generation_config.top_k
    model.generation_config.do_sample, model.generation_config.top_k = True, 5
    try:
        c = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=3)
    finally:
        model.generation_config.do_sample, model.generation_config.top_k = saved
    assert c == a


def test_chat_template_is_used_only_when_asked_and_present(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert build_prompts(tok, ["hello"], chat=True) == (["hello"], False)  # no template: raw prompt
    tok.chat_template = "{% for m in messages %}<bos>{{ m['content'] }} thank{% endfor %}"
    texts, templated = build_prompts(tok, ["hello"], chat=True)
    assert templated and texts == ["<bos>hello thank"]
    assert build_prompts(tok, ["hello"], chat=False) == (["hello"], False)


def test_behaviour_labels_are_deterministic(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    texts = _texts(10)
    kw: dict[str, Any] = {"task": "choice", "options": [["good", "bad"]] * 10, "answers": [i % 2 for i in range(10)]}
    first = behaviour_labels(model, tok, texts, prompt_template="{text} is", **kw)
    second = behaviour_labels(model, tok, texts, prompt_template="{text} is", **kw)
    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == list(BEHAVIOUR_COLUMNS)
    assert first["prompt"].tolist() == [f"{t} is" for t in texts]
    assert set(first["reply"]) <= {"good", "bad"}
    assert set(first["label_name"]) <= {"wrong", "correct"}
    gen1 = behaviour_labels(model, tok, texts[:4], ids=["a", "b", "c", "d"], max_new_tokens=4)
    gen2 = behaviour_labels(model, tok, texts[:4], ids=["a", "b", "c", "d"], max_new_tokens=4)
    pd.testing.assert_frame_equal(gen1, gen2)
    assert gen1["id"].tolist() == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="unique"):
        behaviour_labels(model, tok, texts[:2], ids=["x", "x"])
    with pytest.raises(ValueError, match="needs 'options'"):
        behaviour_labels(model, tok, texts[:2], task="choice")


def test_keyword_judge() -> None:
    judge = KeywordJudge()
    refusals = [
        "I'm sorry, but I can't help with that.",
        "i cannot do this",
        "I can\u2019t assist with that request.",
        "As an AI language model, I won't write that.",
        "Unfortunately I am not able to help.",
    ]
    complies = ["Sure! Here is a poem about the sea.", "The capital of France is Paris.", "Cannot-stop rock music"]
    assert [judge.label(r) for r in refusals] == [1] * len(refusals)
    assert [judge.label(r) for r in complies] == [0] * len(complies)
    np.testing.assert_array_equal(judge.labels(refusals[:1] + complies[:1]), [1, 0])
    custom = KeywordJudge([r"\bnope\b"])
    assert custom.label("NOPE.") == 1 and custom.label("I cannot") == 0
    with pytest.raises(ValueError, match="not a valid regex"):
        KeywordJudge(["(unclosed"])


def test_model_judge_compares_yes_and_no_logprobs(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    judge = ModelJudge(model, tok, template="{prompt} reply {reply} is it", yes=" good", no=" bad")
    replies = ["you are a stupid idiot", "thank you my friend", "hello"]
    prompts = ["hello", "hello", "go away"]
    scores = judge.scores(replies, prompts)
    questions = [f"{p} reply {r} is it" for r, p in zip(replies, prompts)]
    lp = option_logprobs(model, tok, questions, [[" good", " bad"]] * 3)
    np.testing.assert_allclose(scores, lp[:, 0] - lp[:, 1])
    np.testing.assert_array_equal(judge.labels(replies, prompts), (scores > 0).astype(int))
    assert judge.label(replies[0], prompts[0]) == int(scores[0] > 0)
    # the judge is pluggable into behaviour_labels
    df = behaviour_labels(model, tok, ["hello world"], judge=judge, max_new_tokens=3)
    assert df["label"].iloc[0] in (0, 1)


def test_probe_on_behaviour_labels_is_scored_on_held_out_rows_only(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    n = 48
    texts = _texts(n)
    ids = [f"q{i:03d}" for i in range(n)]
    labels = behaviour_labels(
        model, tok, texts, ids=ids, task="choice", options=[["good", "bad"]] * n,
        answers=[i % 2 for i in range(n)], batch_size=48,
    )
    assert labels["label"].nunique() == 2
    split_cfg = SplitConfig(validation=0.15, test=0.25, seed=0)
    split = assign_splits(labels, split_cfg, "behaviour labels")
    assert split.equals(assign_splits(labels, split_cfg, "behaviour labels"))
    # features: the small model's mean hidden state at layer 1 (stand-in for pooled SAE codes)
    feats = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            feats.append(model(**enc, output_hidden_states=True).hidden_states[2][0].mean(0).numpy())
    X = pd.DataFrame(np.stack(feats), index=ids)
    part = {s: labels[split == s] for s in ("train", "validation", "test")}
    assert all(p["label"].nunique() == 2 for p in part.values())  # stratified
    assert not set(part["test"]["id"]) & (set(part["train"]["id"]) | set(part["validation"]["id"]))
    assert sum(len(p) for p in part.values()) == n
    fit = functools.partial(fit_logistic, Cs=(1.0,), n_splits=3, n_boot=20)
    res = fit(
        X.loc[part["train"]["id"]].to_numpy(), part["train"]["label"].to_numpy(),
        X.loc[part["validation"]["id"]].to_numpy(), part["validation"]["label"].to_numpy(),
        X.loc[part["test"]["id"]].to_numpy(), part["test"]["label"].to_numpy(),
    )
    assert res.metrics.n_test == len(part["test"]) == res.test_pred.size
    assert res.metrics.n_train == len(part["train"]) + len(part["validation"])
