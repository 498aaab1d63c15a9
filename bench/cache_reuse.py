"""Section 2: a second SAE on an already cached layer costs no LM forward.

Through the library: ``build_dataset`` -> ``build_hidden_states`` (miss: extracts) -> features with SAE #1;
then ``build_hidden_states`` again (hit) -> features with SAE #2. LM forward calls are counted with forward
pre-hooks on the model (the whole LM and its base model), and model loads through the ``loader``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp


def features(cache: Any, sae: Any) -> sp.csr_matrix:
    """Sum-pooled SAE codes, shard by shard, in text order."""
    from mosaic_dag.features.pooling import pool_sparse
    from mosaic_dag.sae.encode import encode_sparse

    pooled, rows = [], []
    for shard in cache.iter_shards():
        codes = encode_sparse(sae, shard.acts, real_mask=shard.real_mask)
        pooled.append(pool_sparse(codes, shard.offsets, shard.real_mask, "sum"))
        rows.append(shard.rows)
    X = sp.csr_matrix(sp.vstack(pooled, format="csr"))
    return X[np.argsort(np.concatenate(rows))]


def write_dataset(path: Path, texts: list[str], labels: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


def run(model_id: str, texts: list[str], labels: list[str], layer: int, sae_a: Any, sae_b: Any, *,
        workdir: Path, max_length: int, batch_tokens: int, loaded: Any | None = None) -> dict[str, Any]:
    """``loaded``: an already loaded model for ``model_id`` (saves a load; the calls are counted the same)."""
    from mosaic_dag.config import parse_config
    from mosaic_dag.data.step import build_dataset, dataset_handle
    from mosaic_dag.lm.hidden_states import build_hidden_states, hidden_cache
    from mosaic_dag.lm.models import load_named_model

    csv_path = write_dataset(Path(workdir) / "bench_texts.csv", texts, labels)
    cfg = parse_config({
        "name": "bench-cache-reuse",
        "data_dir": str(Path(workdir) / "data"),
        "models": [{"name": "m", "id": model_id, "layers": [layer], "max_length": max_length,
                    "batch_tokens": batch_tokens, "device": "cpu"}],
        "datasets": [{"name": "bench", "path": str(csv_path), "text_field": "text", "label_field": "label",
                      "language": "en"}],
    }, "bench")
    data = dataset_handle(build_dataset(cfg, "bench", "en"), "bench.en")

    counts = {"lm_forward": 0, "base_forward": 0, "model_loads": 0}
    model_box: dict[str, Any] = {}

    def loader(_name: str = "m") -> Any:
        counts["model_loads"] += 1
        if "m" not in model_box:
            m = loaded if loaded is not None else load_named_model(cfg, "m")
            if loaded is not None:  # same weights, this config's label
                from mosaic_dag.lm.models import LoadedModel

                m = LoadedModel("m", m.hf_name, m.model, m.tokenizer, m.fingerprint, m.device, m.dtype)
            model_box["m"] = m
        return model_box["m"]

    # Hooks go on the (shared) torch modules, so every forward of this model is counted, whoever runs it.
    lm = loader().model
    counts["model_loads"] = 0
    handles = [
        lm.register_forward_pre_hook(lambda *_: counts.__setitem__("lm_forward", counts["lm_forward"] + 1)),
        lm.base_model.register_forward_pre_hook(lambda *_: counts.__setitem__("base_forward", counts["base_forward"] + 1)),
    ]
    try:
        t0 = time.perf_counter()
        first = build_hidden_states(cfg, data, loader=loader)
        Xa = features(hidden_cache(first.handle, "m", layer), sae_a)
        t1 = time.perf_counter()
        after_first = dict(counts)
        second = build_hidden_states(cfg, data, loader=loader)
        t2 = time.perf_counter()
        Xb = features(hidden_cache(second.handle, "m", layer), sae_b)
        t3 = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    second_forwards = counts["base_forward"] - after_first["base_forward"] + counts["lm_forward"] - after_first["lm_forward"]
    return {
        "texts": len(texts),
        "first": {"cache_hit": first.cache_hit, "seconds": t1 - t0, "forward_calls": after_first["base_forward"],
                  "model_loads": after_first["model_loads"], "d_sae": int(Xa.shape[1])},
        "second": {"cache_hit": second.cache_hit, "seconds": t3 - t1, "build_hidden_s": t2 - t1, "encode_pool_s": t3 - t2,
                   "forward_calls": second_forwards, "model_loads": counts["model_loads"] - after_first["model_loads"],
                   "d_sae": int(Xb.shape[1]), "rows": int(Xb.shape[0])},
    }
