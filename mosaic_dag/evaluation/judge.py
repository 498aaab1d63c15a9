"""The language model as a zero-/k-shot judge: a fourth baseline on the probes' own test rows.

Each class is one answer option; the judge's answer for a text is the option with the highest
summed log-probability after the prompt (``behaviour.option_logprobs``, as the behaviour labels
score options). In-context examples come from the TRAIN split only, so no validation or test
text ever reaches a prompt. The judge is paired with the validation-selected SAE probe of the
same partition on the identical test rows (``comparisons.paired_comparison``), and both are
costed in the same step on the same texts: seconds and LM tokens per 1,000 texts for the judge
(every prompt + option the model reads) against the features the probe needs (one forward pass
up to the SAE's layer, the SAE encode and the pooling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mosaic_dag.evaluation.comparisons import Paired, paired_comparison
from mosaic_dag.errors import ConfigError
from mosaic_dag.handles import TableHandle
from mosaic_dag.paths import judge_files
from mosaic_dag.storage import write_parquet

__all__ = ["JudgeRun", "class_options", "feature_cost", "judge_texts", "pick_shots", "shot_prefix", "write_judge"]


def pick_shots(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` positions into ``labels`` (the TRAIN rows), classes taken in turn, seeded; fixed order."""
    labels = np.asarray(labels)
    if k <= 0 or labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < min(k, labels.size):
        for pool in pools:
            if pool and len(out) < k:
                out.append(int(pool.pop()))
    return np.asarray(out, dtype=np.int64)


def shot_prefix(template: str, texts: Sequence[str], answers: Sequence[str]) -> str:
    """The in-context examples: each the template filled with its text and followed by its answer."""
    return "".join(template.replace("{text}", t) + a + "\n\n" for t, a in zip(texts, answers, strict=True))


def class_options(label_names: Mapping[int, str], options: Mapping[str, str]) -> tuple[np.ndarray, list[str]]:
    """(class labels, their option texts) in label order; every class of the data needs an option."""
    classes = np.asarray(sorted(label_names), dtype=np.int64)
    missing = [label_names[int(c)] for c in classes if label_names[int(c)] not in options]
    if missing:
        raise ConfigError(f"judge.options: no answer for the classes {missing} (the dataset's label names are "
                          f"{[label_names[int(c)] for c in classes]}); add one option per class")
    return classes, [options[label_names[int(c)]] for c in classes]


@dataclass
class JudgeRun:
    """``scores``: summed option log-probabilities [texts, classes]; ``pred``: the class of the best option."""

    pred: np.ndarray
    scores: np.ndarray
    seconds: float
    lm_tokens: int

    @property
    def proba(self) -> np.ndarray:
        """The option scores normalised over the classes (for AUROC)."""
        z = self.scores - self.scores.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _n_tokens(tokenizer: Any, prompts: Sequence[str], options: Sequence[str], max_length: int | None) -> int:
    """Tokens the LM reads for every (prompt, option) pair, counted as ``option_logprobs`` builds them."""
    opt = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    total = 0
    for p in prompts:
        n = len(tokenizer(p, add_special_tokens=True)["input_ids"])
        total += sum(min(n + o, max_length) if max_length else n + o for o in opt)
    return total


def judge_texts(model: Any, tokenizer: Any, texts: Sequence[str], template: str, classes: np.ndarray,
                options: Sequence[str], *, prefix: str = "", batch_size: int = 8,
                max_length: int | None = None) -> JudgeRun:
    """The judge's class for each text (ties: the first class), with its cost on these texts."""
    from mosaic_dag.lm.scoring import option_logprobs

    prompts = [prefix + template.replace("{text}", t) for t in texts]
    start = time.perf_counter()
    scores = option_logprobs(model, tokenizer, prompts, [list(options)] * len(prompts), batch_size,
                             max_length=max_length)
    seconds = time.perf_counter() - start
    pred = np.asarray(classes)[np.argmax(scores, axis=1)] if len(prompts) else np.zeros(0, dtype=np.int64)
    return JudgeRun(pred=pred, scores=scores, seconds=seconds,
                    lm_tokens=_n_tokens(tokenizer, prompts, options, max_length))


def feature_cost(loaded: Any, layer: int, sae: Any, texts: Sequence[str], *, max_length: int,
                 batch_tokens: int) -> tuple[float, int]:
    """(seconds, LM tokens) for what a probe needs per text: the forward pass stopped after block
    ``layer``, the SAE encode of the real tokens and their mean pooling (the probe's own prediction,
    one sparse dot product, is left out)."""
    import torch

    from mosaic_dag.lm.extract import forward_layers, make_batches, special_ids, tokenize

    tok = loaded.tokenizer
    ids, _ = tokenize(tok, texts, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    specials = torch.as_tensor(special_ids(tok), dtype=torch.long)
    param = sae.W_dec
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in make_batches(ids, batch_tokens, pad):
            hidden = forward_layers(loaded, [layer], batch.input_ids, batch.attention_mask)[layer]
            real = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, specials)
            for r in range(hidden.shape[0]):
                x = hidden[r][real[r].to(hidden.device)].to(device=param.device, dtype=param.dtype)
                if x.shape[0]:
                    sae.encode(x).mean(dim=0)
    return time.perf_counter() - start, int(sum(len(i) for i in ids))


def per_1k(value: float, n_texts: int) -> float:
    return float(value) * 1000.0 / n_texts if n_texts else math.nan


@dataclass
class JudgeOutcome:
    """One partition's judge: its results row (RESULT_COLUMNS), per-row test predictions, the paired
    difference to the selected SAE probe and the cost of both (per 1,000 texts)."""

    row: pd.DataFrame
    predictions: pd.DataFrame
    paired: Paired | None
    cost: dict[str, float] = field(default_factory=dict)
    sae_probe: str = ""
    shots: list[str] = field(default_factory=list)


def judge_label(shots: int) -> str:
    return f"judge/{shots}-shot"


def cost_line(cost: Mapping[str, float]) -> str:
    """One plain line for the results table: both costs per 1,000 texts."""
    return (f"per 1k texts: judge {cost['judge_seconds_per_1k']:.2f} s, {cost['judge_lm_tokens_per_1k']:,.0f} LM tokens; "
            f"features+probe {cost['features_seconds_per_1k']:.2f} s, {cost['features_lm_tokens_per_1k']:,.0f} LM tokens")


def selected_sae(results: pd.DataFrame, predictions: pd.DataFrame | None) -> tuple[str, np.ndarray] | None:
    """The validation-selected SAE probe of one partition (``evaluation.best_rows``) and its test
    predictions in ``predictions``' row order; None when the partition has no SAE probe."""
    from mosaic_dag.evaluation.selection import best_rows

    sae = results[(results["features"] == "sae") & (results["train_language"] == results["test_language"])]
    if sae.empty or predictions is None:
        return None
    label = str(best_rows(sae).iloc[0]["probe"])
    if label not in predictions.columns:
        return None
    return label, predictions[label].to_numpy()


def judge_partition(cfg: Any, target: Any, dataset: str, language: str, frame: pd.DataFrame, loaded: Any,
                    sae: Any, results: pd.DataFrame, predictions: pd.DataFrame | None, models: Any = None) -> JudgeOutcome:
    """Judge one partition's test rows, pair it with the selected SAE probe, cost both.

    ``loaded``: the judge model; ``results``/``predictions``: the probes step's rows and per-row test
    predictions of this partition (the same test ids, checked); ``models``: the ``ModelCache`` the
    target model is taken from when the judge is another model."""
    from mosaic_dag.evaluation.artifacts import label_names
    from mosaic_dag.evaluation.comparisons import describe
    from mosaic_dag.evaluation.schema import RESULT_COLUMNS, result_row, typed_results
    from mosaic_dag.evaluation.sweeps import SplitRows
    from mosaic_dag.probes.metrics import evaluate

    jc, cls = cfg.judge, cfg.classification
    rows = SplitRows.of(frame)
    texts = frame["text"].astype(str).to_numpy()
    classes, options = class_options(label_names(frame), jc.options or {})
    by_class = dict(zip(classes.tolist(), options, strict=True))
    shots = rows.train[pick_shots(rows.y(rows.train), jc.shots, cls.seed)]
    prefix = shot_prefix(jc.template, list(texts[shots]), [by_class[int(v)] for v in rows.y(shots)])
    test_texts = list(texts[rows.test])
    run = judge_texts(loaded.model, loaded.tokenizer, test_texts, jc.template, classes, options, prefix=prefix,
                      batch_size=jc.batch_size, max_length=jc.max_length)
    y_test = rows.y(rows.test)
    m = evaluate(y_test, run.pred, run.proba, classes, cls.seed, n_train=len(shots), n_boot=cls.bootstrap)
    mc = cfg.model(target.model)
    from mosaic_dag.lm.models import default_batch_tokens

    f_sec, f_tok = feature_cost(loaded if jc.model in (None, target.model) else _target_model(cfg, target, models), target.layer,
                                sae, test_texts, max_length=mc.max_length,
                                batch_tokens=mc.batch_tokens or default_batch_tokens(loaded.device))
    n = len(test_texts)
    cost = {"judge_seconds_per_1k": per_1k(run.seconds, n), "judge_lm_tokens_per_1k": per_1k(run.lm_tokens, n),
            "features_seconds_per_1k": per_1k(f_sec, n), "features_lm_tokens_per_1k": per_1k(f_tok, n)}
    label = judge_label(jc.shots)
    pred_frame = pd.DataFrame({"id": frame["id"].to_numpy()[rows.test], "y_true": y_test, label: run.pred})
    paired, sae_label = None, ""
    chosen = selected_sae(results, predictions)
    if chosen is not None and predictions is not None:
        if list(predictions["id"].astype(str)) != list(pred_frame["id"].astype(str)):
            raise ValueError(f"judge {target.key}: the probes' test rows differ from the dataset's; re-materialize probes")
        sae_label = chosen[0]
        paired = paired_comparison("sae-judge", y_test, chosen, (label, run.pred), n_boot=cls.bootstrap, seed=cls.seed)
    record = result_row(**{
        "model": target.model, "layer": target.layer, "sae": "",  # the partition it is paired in; judge.model answers
        "dataset": dataset, "language": language, "train_language": language, "test_language": language,
        "features": "judge", "pooling": "", "threshold": math.nan, "top_n": None,  # shots: in probe and n_train
        "classifier": "judge", "k": None, "probe": label, "validation_macro_f1": math.nan, "selected": True,
        "macro_f1": m.macro_f1, "macro_f1_ci_low": m.macro_f1_ci_low, "macro_f1_ci_high": m.macro_f1_ci_high,
        "accuracy": m.accuracy, "auroc": m.auroc, "n_train": len(shots), "n_test": m.n_test,
        "vs_judge": describe(paired) if paired is not None else "", "cost": cost_line(cost),
    })
    row = typed_results(pd.DataFrame.from_records([record], columns=RESULT_COLUMNS))
    return JudgeOutcome(row, pred_frame, paired, cost, sae_label, [str(i) for i in frame["id"].to_numpy()[shots]])


def write_judge(cfg: Any, target: Any, dataset: str, language: str, outcome: JudgeOutcome, mlflow_run_id: str,
                inputs: str) -> TableHandle:
    """Write the partition's test predictions, then its results row (the row points at them); the handle of both,
    results row first."""
    row_path, pred_path = judge_files(cfg, target, dataset, language)
    write_parquet(pred_path, outcome.predictions)
    write_parquet(row_path, outcome.row.assign(mlflow_run_id=mlflow_run_id))
    return TableHandle(paths=[str(row_path), str(pred_path)], inputs=inputs)


def _target_model(cfg: Any, target: Any, models: Any) -> Any:
    from mosaic_dag.lm.models import load_named_model

    return load_named_model(cfg, target.model, models)

