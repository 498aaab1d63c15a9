"""Do the probe's latents matter — to the probe, and to the model?

For the selected SAE probe of a partition and its top latents per class, two numbers each:

* **probe reliance** (``probe_flips``): the share of test decisions that change when the latent's
  column is removed (set to 0) from the pooled features the probe reads;
* **model reliance** (``model_reliance``): during the model's forward, the output of block L (the
  SAE's layer) is replaced on every real token by the SAE reconstruction with that latent zeroed
  (or scaled) *plus the SAE's error term* ``h − decode(encode(h))``, so nothing but that latent
  changes. Algebraically that is ``h + decode(z') − decode(z)``, which is how it is computed: a
  latent that does not fire changes nothing, exactly. The change downstream is the mean change of
  the log-probability of the labelled answer (behaviour datasets: the option the model chose on
  the clean run) or, without behaviour labels, the mean KL divergence of the next-token
  distribution at the last real token (clean ‖ intervened).

BOS/special tokens and padding are never intervened on, as no pooling ever counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["INTERVENTION_COLUMNS", "latent_intervention", "model_reliance", "probe_flips", "reliance_table",
           "verdict", "build_interventions", "write_interventions"]

INTERVENTION_COLUMNS = ["class", "latent", "weight", "probe_flip_share", "model_effect", "model_metric",
                        "fires_share", "verdict"]


def _without(X: Any, latent: int) -> Any:
    if sp.issparse(X):
        out = sp.csr_matrix(X, copy=True)
        out.data[out.indices == latent] = 0  # in place: no change of the sparsity structure
        out.eliminate_zeros()
        return out
    out = np.array(X, copy=True)
    out[:, latent] = 0
    return out


def probe_flips(predict: Callable[[Any], np.ndarray], X_test: Any, latents: Sequence[int]) -> dict[int, float]:
    """Per latent, the share of test rows whose predicted class changes when that latent's column is 0."""
    base = np.asarray(predict(X_test))
    out: dict[int, float] = {}
    for latent in latents:
        out[int(latent)] = float(np.mean(np.asarray(predict(_without(X_test, int(latent)))) != base)) if base.size else math.nan
    return out


@contextmanager
def latent_intervention(model: Any, sae: Any, layer: int, latent: int | None, scale: float,
                        special_ids: Sequence[int]) -> Iterator[dict[str, float]]:
    """While active, block ``layer``'s output on real tokens becomes ``h + decode(z') − decode(z)``
    with ``z' = z`` except ``z'[latent] = scale · z[latent]`` (``latent=None``: no change, the clean run).
    Yields counters: how many real tokens the latent fired on, of how many."""
    import torch

    from mosaic_dag.lm.models import decoder_layers

    block = decoder_layers(model)[layer]
    state: dict[str, Any] = {"ids": None}
    counts = {"fired": 0.0, "tokens": 0.0}
    specials = torch.as_tensor(list(special_ids), dtype=torch.long)
    param = sae.W_dec

    def remember(_module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        state["ids"] = ids

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if latent is None:
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        ids = state["ids"]
        real = ~torch.isin(ids, specials.to(ids.device)) if ids is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
        x = hidden[real].to(device=param.device, dtype=param.dtype)
        z = sae.encode(x)
        fired = z[:, latent] != 0
        counts["fired"] += float(fired.sum())
        counts["tokens"] += float(x.shape[0])
        if not bool(fired.any()):
            return None  # nothing to change: the forward stays bit-identical to the clean one
        z2 = z.clone()
        z2[:, latent] = z2[:, latent] * scale
        new = hidden.clone()
        new[real] = (x + sae.decode(z2) - sae.decode(z)).to(device=hidden.device, dtype=hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    base = getattr(model, "base_model", model)
    pre = base.register_forward_pre_hook(remember, with_kwargs=True)
    handle = block.register_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()
        pre.remove()


def _last_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], max_length: int,
                         batch_size: int) -> np.ndarray:
    """log-softmax of the next-token logits at each prompt's last real token [prompts, vocab]."""
    import torch

    from mosaic_dag.lm.scoring import _final_hidden, _head_logits

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"])[-max_length:] for p in prompts]
    rows: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            longest = max(len(c) for c in chunk)
            x = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for r, c in enumerate(chunk):
                x[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            hidden = _final_hidden(model, x.to(device), mask.to(device))
            last = torch.tensor([len(c) - 1 for c in chunk], device=device)
            h = hidden[torch.arange(len(chunk), device=device), last]
            rows.append(torch.log_softmax(_head_logits(model, h), dim=-1).double().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def model_reliance(loaded: Any, sae: Any, layer: int, prompts: Sequence[str], latents: Sequence[int], *,
                   scale: float = 0.0, options: Sequence[str] | None = None, max_length: int = 128,
                   batch_size: int = 8) -> tuple[dict[int, float], dict[int, float], str]:
    """(effect per latent, share of real tokens it fires on, metric name).

    ``options`` given (behaviour labels): the mean absolute change of the log-probability of the
    option the clean model chose, metric ``abs_delta_logprob``; else the mean KL(clean ‖ intervened)
    of the next-token distribution at the last real token, metric ``kl_last_token``."""
    from mosaic_dag.data.behaviour import option_logprobs
    from mosaic_dag.lm.extract import special_ids

    model, tok = loaded.model, loaded.tokenizer
    specials = special_ids(tok).tolist()
    effects: dict[int, float] = {}
    fires: dict[int, float] = {}

    def run(latent: int | None) -> tuple[np.ndarray, dict[str, float]]:
        with latent_intervention(model, sae, layer, latent, scale, specials) as counts:
            if options is not None:
                scores = option_logprobs(model, tok, prompts, [list(options)] * len(prompts), batch_size,
                                         max_length=max_length)
            else:
                scores = _last_token_logprobs(model, tok, prompts, max_length, batch_size)
        return scores, counts

    clean, _ = run(None)
    chosen = np.argmax(clean, axis=1) if options is not None else None
    for latent in latents:
        scores, counts = run(int(latent))
        if chosen is not None:
            rows = np.arange(len(prompts))
            effects[int(latent)] = float(np.mean(np.abs(scores[rows, chosen] - clean[rows, chosen])))
        else:
            p = np.exp(clean)
            effects[int(latent)] = float(np.mean(np.sum(p * (clean - scores), axis=1)))
        fires[int(latent)] = counts["fired"] / counts["tokens"] if counts["tokens"] else 0.0
    return effects, fires, "abs_delta_logprob" if options is not None else "kl_last_token"


def verdict(flip_share: float, effect: float, min_flip_share: float, min_effect: float) -> str:
    probe, model = flip_share >= min_flip_share, effect >= min_effect
    if probe and model:
        return "probe and model rely on it"
    if probe:
        return "drives the probe, not the model"
    if model:
        return "drives the model, not the probe"
    return "neither relies on it"


@dataclass(frozen=True)
class LatentChoice:
    cls: str
    latent: int
    weight: float


def reliance_table(choices: Sequence[LatentChoice], flips: Mapping[int, float], effects: Mapping[int, float],
                   fires: Mapping[int, float], metric: str, *, min_flip_share: float, min_effect: float) -> pd.DataFrame:
    """One row per (class, latent): both numbers and the plain verdict."""
    records = [{"class": c.cls, "latent": c.latent, "weight": c.weight, "probe_flip_share": flips[c.latent],
                "model_effect": effects[c.latent], "model_metric": metric, "fires_share": fires[c.latent],
                "verdict": verdict(flips[c.latent], effects[c.latent], min_flip_share, min_effect)} for c in choices]
    return pd.DataFrame.from_records(records, columns=INTERVENTION_COLUMNS)


def _probe_spec(row: pd.Series) -> Any:
    from mosaic_dag.evaluation.sweeps import ProbeSpec

    def opt(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v) else v

    top_n, k, threshold = opt(row["top_n"]), opt(row["k"]), opt(row["threshold"])
    return ProbeSpec("sae", str(row["pooling"]) or None, int(top_n) if top_n is not None else None,
                     float(threshold) if threshold is not None else None, str(row["classifier"]),
                     int(k) if k is not None else None)


def _choices(result: Any, names: Mapping[int, str], top: int) -> list[LatentChoice]:
    """Top latents per class of a linear probe; a tree's by importance (class: the one whose train mean is higher)."""
    from mosaic_dag.probes.interpret import top_latents

    try:
        per_class = top_latents(result, top=top)
    except ValueError:  # a tree: no weights per class
        est = result.estimator.steps[-1][1] if hasattr(result.estimator, "steps") else result.estimator
        imp = np.asarray(getattr(est, "feature_importances_", []), dtype=np.float64)
        orig = result.selected_features if result.selected_features is not None else np.arange(imp.size)
        order = [int(j) for j in np.argsort(-imp, kind="stable")[: top * 2] if imp[j] > 0]
        return [LatentChoice("(tree: by importance)", int(orig[j]), float(imp[j])) for j in order]
    return [LatentChoice(names.get(int(c), str(c)), int(i), float(w)) for c, items in per_class.items() for i, w in items]


@dataclass
class InterventionOutcome:
    table: pd.DataFrame
    probe: str
    refit_matches: bool
    metric: str


def build_interventions(cfg: Any, target: Any, pooled_handle: Any, data: Any, results: pd.DataFrame,
                        predictions: pd.DataFrame | None, loaded: Any, sae: Any) -> InterventionOutcome:
    """Both reliance numbers for the top latents of one partition's validation-selected SAE probe.

    The probe is fitted again with its selected settings (same rows, same seed; ``refit_matches``
    says whether its test predictions equal the probes step's)."""
    from mosaic_dag.evaluation.artifacts import label_names
    from mosaic_dag.evaluation.selection import best_rows
    from mosaic_dag.evaluation.sweeps import SplitRows, fit_spec
    from mosaic_dag.features.pooled import PooledResult, feature_name, read_matrix
    from mosaic_dag.data.step import read_frame
    from mosaic_dag.features.pooling import binarize
    from mosaic_dag.probes.fit import predict

    ic, cls = cfg.interventions, cfg.classification
    frame = read_frame(data)
    dataset, _, language = data.key.partition(".")
    rows = SplitRows.of(frame)
    from mosaic_dag.data.images import is_image_frame

    sae_rows = results[(results["features"] == "sae") & (results["train_language"] == results["test_language"])]
    if sae_rows.empty or is_image_frame(frame):  # an image row's forward needs its pixels: not intervened on here
        return InterventionOutcome(pd.DataFrame(columns=INTERVENTION_COLUMNS), "", False, "")
    row = best_rows(sae_rows).iloc[0]
    spec = _probe_spec(row)
    pooled = PooledResult.of(pooled_handle)
    X = read_matrix(pooled.files[feature_name("sae", spec.pooling or "", spec.top_n)])
    if spec.threshold is not None:
        X = binarize(X, spec.threshold, signed=pooled.signed)
    result = fit_spec(spec, X, rows, cls.seed, 0, language)
    matches = bool(predictions is not None and row["probe"] in predictions.columns
                   and np.array_equal(predictions[row["probe"]].to_numpy(), np.asarray(result.test_pred)))
    choices = _choices(result, label_names(frame), ic.top)
    latents = sorted({c.latent for c in choices})
    flips = probe_flips(lambda M: predict(result.estimator, M)[0], X[rows.test], latents)
    texts = frame["text"].astype(str).to_numpy()[rows.test][: ic.texts].tolist()
    options = None
    beh = cfg.dataset(dataset).behaviour
    if beh is not None and beh.task == "choice" and beh.model == target.model:
        texts = [beh.prompt_template.replace("{text}", t) for t in texts]
        options = list(beh.options or [])
    effects, fires, metric = model_reliance(loaded, sae, target.layer, texts, latents, scale=ic.scale, options=options,
                                            max_length=cfg.model(target.model).max_length, batch_size=ic.batch_size)
    table = reliance_table(choices, flips, effects, fires, metric, min_flip_share=ic.min_flip_share,
                           min_effect=ic.min_effect)
    table = table.assign(model=target.model, layer=target.layer, sae=target.sae, dataset=dataset, language=language,
                         probe=str(row["probe"]), scale=ic.scale, n_test=int(rows.test.size), n_texts=len(texts))
    return InterventionOutcome(table, str(row["probe"]), matches, metric)


def write_interventions(cfg: Any, target: Any, dataset: str, language: str, table: pd.DataFrame) -> Path:
    """The partition's interventions table, where the report reads it (``paths.interventions_file``)."""
    from mosaic_dag.paths import interventions_file
    from mosaic_dag.storage import write_parquet

    path = interventions_file(cfg, target, dataset, language)
    write_parquet(path, table)
    return path
