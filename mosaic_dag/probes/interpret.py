"""What the SAE probe learned, for one partition: the validation-selected SAE probe's top latents per class
(weight, activation frequency, class-mean difference), the test texts that make each latent fire with the
firing tokens marked, Neuronpedia links where the SAE has them, and the best decision-tree probe drawn
with latent ids as node labels.

Statistics come from train+validation rows; the example texts are test rows (shown, never used to choose).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

__all__ = ["Interpretation", "interpret_partition", "latent_table", "top_latents", "tree_figure"]

LATENT_COLUMNS = ["class", "latent", "weight", "activation_frequency", "class_mean_diff", "neuronpedia"]


@dataclass
class Interpretation:
    """One partition's latent interpretation; ``examples``: per latent, test texts as (token, activation) lists."""

    partition: str
    probe: str
    latents: pd.DataFrame
    examples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    tree_probe: str = ""
    tree_png: bytes | None = None
    note: str = ""

    def markdown(self, max_rows: int = 30) -> str:
        from mosaic_dag.tables import markdown_table

        lines = [f"Selected SAE probe `{self.probe}` (chosen on validation). {self.note}".strip(), ""]
        shown = self.latents.assign(neuronpedia=self.latents["neuronpedia"].map(lambda u: f"[open]({u})" if u else ""))
        lines += [markdown_table(shown, max_rows=max_rows), ""]
        for latent, texts in list(self.examples.items())[:6]:
            lines.append(f"**latent {latent}** fires most on:")
            for ex in texts:
                marked = "".join(f"**{t}**" if v > 0 and t.strip() else t for t, v in ex["tokens"])
                lines.append(f"- ({ex['label']}, {ex['value']:.3g}) {marked.replace(chr(10), ' ')[:300]}")
            lines.append("")
        if self.tree_png:
            import base64

            lines += [f"Decision-tree probe `{self.tree_probe}`:", "",
                      f"![tree](data:image/png;base64,{base64.b64encode(self.tree_png).decode('ascii')})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        from mosaic_dag.report.html import html_table

        shown = self.latents.assign(neuronpedia=self.latents["neuronpedia"].map(
            lambda u: f"<a href='{html.escape(u)}'>Neuronpedia</a>" if u else ""))
        parts = [f"<h3>{html.escape(self.partition)}</h3>",
                 f"<p class='note'>Selected SAE probe <code>{html.escape(self.probe)}</code> (chosen on validation). "
                 f"{html.escape(self.note)} Activation frequency and class-mean difference: train+validation texts; "
                 "examples: test texts, firing tokens highlighted (darker = stronger).</p>",
                 html_table(shown, raw_columns=("neuronpedia",))]
        for latent, texts in self.examples.items():
            items = []
            for ex in texts:
                top = max((v for _, v in ex["tokens"]), default=0.0) or 1.0
                toks = "".join(
                    f"<mark style='opacity:{0.35 + 0.65 * min(v / top, 1):.2f}' title='{v:.3g}'>{html.escape(t)}</mark>"
                    if v > 0 else html.escape(t) for t, v in ex["tokens"])
                items.append(f"<li><small>{html.escape(str(ex['label']))}, pooled {ex['value']:.3g}</small> {toks}</li>")
            parts.append(f"<p><b>latent {latent}</b> fires most on:</p><ul>{''.join(items)}</ul>")
        if self.tree_png:
            import base64

            parts.append(f"<p>Decision-tree probe <code>{html.escape(self.tree_probe)}</code>:</p>"
                         f"<img alt='decision tree' src='data:image/png;base64,{base64.b64encode(self.tree_png).decode('ascii')}'>")
        return "\n".join(parts)

    def save(self, folder: Path, stem: str) -> list[Path]:
        """``<stem>.latents.json`` (not parquet: results tables are every parquet there) and
        ``<stem>.interpretation.html`` (a fragment the report includes)."""
        from mosaic_dag.storage import atomic_path

        table = folder / f"{stem}.latents.json"
        with atomic_path(table) as tmp:
            tmp.write_text(self.latents.to_json(orient="records", indent=1))
        frag = folder / f"{stem}.interpretation.html"
        with atomic_path(frag) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return [table, frag]


def _column(X: Any, j: int) -> np.ndarray:
    col = X[:, j]
    return np.asarray(col.toarray()).ravel() if sp.issparse(col) else np.asarray(col).ravel()


def latent_table(weights: Mapping[Any, Sequence[tuple[int, float]]], X: Any, y: np.ndarray, rows: np.ndarray,
                 names: Mapping[int, str], neuronpedia_id: str | None) -> pd.DataFrame:
    """Per class and latent: probe weight, share of ``rows`` where the latent is active, and the mean activation
    in the class minus the mean outside it (both over ``rows``)."""
    records = []
    for cls_value, items in weights.items():
        in_cls = y[rows] == cls_value
        for latent, weight in items:
            col = _column(X, int(latent))[rows]
            diff = float(col[in_cls].mean() - col[~in_cls].mean()) if in_cls.any() and (~in_cls).any() else float("nan")
            try:
                cname = names.get(int(cls_value), str(cls_value))
            except (TypeError, ValueError):
                cname = str(cls_value)
            records.append({"class": cname, "latent": int(latent), "weight": round(float(weight), 4),
                            "activation_frequency": round(float((col != 0).mean()), 4),
                            "class_mean_diff": round(diff, 4),
                            "neuronpedia": f"https://www.neuronpedia.org/{neuronpedia_id}/{int(latent)}" if neuronpedia_id else ""})
    return pd.DataFrame.from_records(records, columns=LATENT_COLUMNS)


def _tree_weights(result: Any, classes: np.ndarray, X: Any, y: np.ndarray, rows: np.ndarray, top: int) -> dict[Any, list]:
    """A tree has no per-class weights: its most important latents, each listed under the class it is higher in."""
    est = result.estimator.steps[-1][1] if hasattr(result.estimator, "steps") else result.estimator
    imp = np.asarray(getattr(est, "feature_importances_", []), dtype=float)
    out: dict[Any, list] = {c: [] for c in classes}
    for j in np.argsort(-imp, kind="stable")[:top]:
        if imp[j] <= 0:
            break
        col = _column(X, int(j))[rows]
        means = [col[y[rows] == c].mean() if (y[rows] == c).any() else -np.inf for c in classes]
        out[classes[int(np.argmax(means))]].append((int(j), float(imp[j])))
    return out


def tree_figure(result: Any, names: Mapping[int, str], label: str) -> Any:
    """The tree probe drawn by sklearn's ``plot_tree``, latent ids as feature names (depth capped at 4)."""
    from sklearn.tree import plot_tree

    from mosaic_dag.report.style import new_figure

    est = result.estimator.steps[-1][1] if hasattr(result.estimator, "steps") else result.estimator
    n_features = int(getattr(est, "n_features_in_", 0))
    depth = min(int(est.get_depth()), 4)
    fig = new_figure(max(6.0, 1.6 * 2 ** depth), 1.8 * (depth + 1) + 0.6)
    ax = fig.add_subplot()
    classes = [names.get(int(c), str(c)) for c in est.classes_]
    plot_tree(est, ax=ax, max_depth=4, feature_names=[f"latent {i}" for i in range(n_features)], class_names=classes,
              filled=True, impurity=False, proportion=True, rounded=True, fontsize=7)
    ax.set_title(f"decision-tree probe {label} (nodes: latent id ≤ threshold)", fontsize=10)
    return fig


def _token_activations(codes_dir: Path, latent: int, rows: set[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per wanted text row: (token ids of its real tokens, the latent's activation on each)."""
    from mosaic_dag.sae.codes import CodesStore
    from mosaic_dag.lm.extract import HiddenCache

    store = CodesStore(codes_dir)
    values: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for shard in store.iter_shards():
        for i, row in enumerate(shard.rows.tolist()):
            if row in rows:
                a, b = int(shard.offsets[i]), int(shard.offsets[i + 1])
                vals = np.asarray(shard.codes[a:b, latent].toarray()).ravel()
                values[row] = (np.asarray(shard.real_mask[a:b], dtype=bool), vals)
    hidden = HiddenCache(Path(store.manifest()["hidden_cache"]))
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for shard in hidden.iter_shards():
        for i, row in enumerate(shard.rows.tolist()):
            if row in values:
                a, b = int(shard.offsets[i]), int(shard.offsets[i + 1])
                real, vals = values[row]
                ids = np.asarray(shard.token_ids[a:b])
                if len(ids) == len(vals):
                    out[row] = (ids[real], vals[real])
    return out


def interpret_partition(
    partition: str,
    runs: Sequence[Any],
    X_by_name: Callable[[str], Any],
    frame: pd.DataFrame,
    names: Mapping[int, str],
    *,
    neuronpedia_id: str | None = None,
    codes_dir: Path | None = None,
    decode: Callable[[int], str] | None = None,
    top: int = 5,
    n_texts: int = 3,
    n_latents_with_texts: int = 3,
) -> Interpretation | None:
    """Interpretation of the validation-selected SAE probe among ``runs``; ``X_by_name(feature_name)`` gives the
    matrix a probe was fitted on (binarized when its spec says so). None when there is no SAE probe."""
    from mosaic_dag.evaluation.selection import best_run
    from mosaic_dag.evaluation.sweeps import SplitRows

    run = best_run(list(runs), "sae")
    if run is None:
        return None
    rows = SplitRows.of(frame)
    fit_rows = np.concatenate([rows.train, rows.validation])
    y = frame["label"].to_numpy()
    X = X_by_name(_matrix_key(run.spec))
    note = ""
    try:
        weights = top_latents(run.result, top=top)
    except ValueError:  # a tree: importances instead of weights
        weights = _tree_weights(run.result, np.unique(y[fit_rows]), X, y, fit_rows, top * 2)
        note = "A tree has no signed weights: `weight` is the latent's importance in it."
    table = latent_table(weights, X, y, fit_rows, names, neuronpedia_id)
    out = Interpretation(partition, run.spec.label, table, note=note)
    if "text" in frame.columns:
        wanted = list(dict.fromkeys(table.sort_values("weight", key=abs, ascending=False)["latent"].tolist()))
        for latent in wanted[:n_latents_with_texts]:
            col = _column(X, latent)[rows.test]
            order = [i for i in np.argsort(-col, kind="stable")[:n_texts] if col[i] > 0]
            picks = [int(rows.test[i]) for i in order]
            tokens: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            if codes_dir is not None and decode is not None and picks:
                try:
                    tokens = _token_activations(codes_dir, latent, set(picks))
                except Exception as err:  # noqa: BLE001 - highlighting is a nicety; the texts still show
                    log.warning("latent %s: token activations unavailable (%s)", latent, err)
            examples = []
            for pos, i in zip(picks, order, strict=True):
                if pos in tokens:
                    ids, vals = tokens[pos]
                    toks = [(decode(int(t)), float(v)) for t, v in zip(ids, vals, strict=True)]
                else:
                    toks = [(str(frame["text"].iloc[pos]), 0.0)]
                label = frame["label_name"].iloc[pos] if "label_name" in frame.columns else frame["label"].iloc[pos]
                examples.append({"id": str(frame["id"].iloc[pos]), "label": str(label), "value": float(col[i]),
                                 "tokens": toks})
            if examples:
                out.examples[int(latent)] = examples
    trees = [r for r in runs if r.spec.features == "sae" and r.spec.classifier == "tree"]
    tree = best_run(trees, "sae") if trees else None
    if tree is not None:
        import io

        buf = io.BytesIO()
        tree_figure(tree.result, names, tree.spec.label).savefig(buf, format="png", dpi=100)
        out.tree_probe, out.tree_png = tree.spec.label, buf.getvalue()
    return out


def _matrix_key(spec: Any) -> str:
    from mosaic_dag.features.pooled import feature_name

    return json.dumps([feature_name(spec.features, spec.pooling or "", spec.top_n), spec.threshold])


def _decoder(cfg: Any, model: str, models: Any = None) -> Callable[[int], str] | None:
    """Token id -> text, from the model's tokenizer (the held model's when ``models``, a ``ModelCache``, has it)."""
    try:
        from mosaic_dag.lm.models import load_tokenizer
        from mosaic_dag.paths import models_dir

        mcfg = cfg.model(model)
        tok = models.tokenizer(mcfg, models_dir()) if models is not None else load_tokenizer(mcfg, models_dir())
    except Exception as err:  # noqa: BLE001 - without a tokenizer the texts show unhighlighted
        log.warning("model %s: no tokenizer for highlighting (%s)", model, err)
        return None
    return lambda i: tok.decode([i])


def interpret_probes(cfg: Any, target: Any, results: Any, frame: pd.DataFrame, pooled_handle: Any,
                     names: Mapping[int, str], partition: str, models: Any = None) -> Interpretation | None:
    """``interpret_partition`` wired to a partition's stored matrices, codes and the model's tokenizer
    (``models``: a ``ModelCache`` whose held model's tokenizer is used)."""
    from mosaic_dag.features.pooled import PooledResult, read_matrix
    from mosaic_dag.features.pooling import binarize

    pooled = PooledResult.of(pooled_handle)
    cache: dict[str, Any] = {}

    def matrix(key: str) -> Any:
        if key not in cache:
            name, threshold = json.loads(key)
            X = read_matrix(pooled.files[name])
            cache[key] = binarize(X, threshold, signed=pooled.signed) if threshold is not None else X
        return cache[key]

    codes_dir = None
    meta = pooled.sae_dir / "meta.json"
    if meta.is_file():
        codes_dir = Path(json.loads(meta.read_text())["codes"])
    return interpret_partition(partition, results.runs, matrix, frame, names,
                               neuronpedia_id=pooled.neuronpedia_id, codes_dir=codes_dir,
                               decode=_decoder(cfg, target.model, models) if codes_dir else None)


def _py(v: Any) -> Any:
    """numpy scalar -> plain Python value (dict keys that JSON/YAML understand)."""
    return v.item() if isinstance(v, np.generic) else v


def _linear_step(estimator: Any) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    est = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    if not isinstance(est, LogisticRegression):
        raise ValueError(f"result: top_latents needs a logistic probe, got {type(est).__name__}")
    return est


def top_latents(
    result: Any,
    feature_names: Sequence[str] | Mapping[int, str] | None = None,
    top: int = 10,
) -> dict[Any, list[tuple[int | str, float]]]:
    """Per class, the features with the largest weights pointing to that class.

    Weights are in the probe's (scaled) input space, so they are comparable across
    features. Indices refer to the original columns (the k-sparse selection is undone);
    with ``feature_names`` the name replaces the index. Binary: the positive class
    (``classes[1]``) gets the largest positive weights, the negative class the most
    negative ones (reported with their negative sign).
    """
    clf = _linear_step(result.estimator)
    coef = np.asarray(clf.coef_, dtype=np.float64)
    classes = np.asarray(clf.classes_)
    sel = result.selected_features
    orig = sel if sel is not None else np.arange(coef.shape[1])

    def name(j: int) -> int | str:
        i = int(orig[j])
        return feature_names[i] if feature_names is not None else i

    def pick(w: np.ndarray, sign: float) -> list[tuple[int | str, float]]:
        order = np.argsort(-sign * w, kind="stable")
        return [(name(int(j)), float(w[j])) for j in order[:top] if sign * w[j] > 0]

    out: dict[Any, list[tuple[int | str, float]]] = {}
    if coef.shape[0] == 1:
        out[_py(classes[0])] = pick(coef[0], -1.0)
        out[_py(classes[1])] = pick(coef[0], 1.0)
    else:
        for ci, c in enumerate(classes):
            out[_py(c)] = pick(coef[ci], 1.0)
    return out
