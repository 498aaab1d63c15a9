"""Capture the residual stream exactly where SAEs are trained, and cache it on disk.

Layer convention (the one sae-lens and Gemma Scope use): **layer L means resid_post of block L**, the
output of ``model.model.layers[L]``. In Hugging Face terms that equals ``hidden_states[L + 1]`` for every
block but the last (HF applies the final norm to ``hidden_states[-1]``); it is never ``hidden_states[L]``
(an off-by-one in the seed scripts).

One forward pass serves every requested layer: hooks on the blocks copy their outputs and the pass is
stopped right after the deepest one, so neither later blocks nor the LM head run. Texts are sorted by
length and packed into batches under a token budget, padded on the right so real tokens keep their
positions; padding and special tokens (BOS) are recorded in a mask and never stored as real.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from mosaic_dag.errors import CacheError, ModelError
from mosaic_dag.lm.fused import fused_blocks
from mosaic_dag.lm.models import LoadedModel, decoder_layers
from mosaic_dag.paths import HIDDEN_CACHE_VERSION
from mosaic_dag.storage import atomic_dir, file_sha256

log = logging.getLogger(__name__)
FP16_MAX = 65000.0


class _StopForward(Exception):
    """Raised from the deepest hook: nothing after that block needs to run."""


@dataclass
class Batch:
    rows: np.ndarray  # dataset row positions, in batch order
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]


@dataclass
class ActivationShard:
    """Token activations of several texts, concatenated without padding."""

    rows: np.ndarray  # int64 [n]: dataset row of each text
    offsets: np.ndarray  # int64 [n + 1]: text i owns tokens offsets[i]:offsets[i+1]
    acts: np.ndarray  # float16/float32 [tokens, d_model]
    token_ids: np.ndarray  # int32 [tokens]
    real_mask: np.ndarray  # bool [tokens]: False for BOS/padding/special tokens
    image_mask: np.ndarray | None = None  # bool [tokens]: image tokens (vision-language caches only)

    @property
    def n_texts(self) -> int:
        return len(self.rows)


@dataclass
class ExtractionStats:
    """What one extraction pass did: the step's metadata and the bench read it."""

    texts: int = 0
    layers: list[int] = field(default_factory=list)
    tokens: int = 0
    real_tokens: int = 0
    batches: int = 0
    forward_calls: int = 0
    seconds: float = 0.0
    truncated_texts: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def check_layers(loaded: LoadedModel, layers: Sequence[int]) -> None:
    n = loaded.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ModelError(
            f"layers {bad} out of range for model {loaded.name!r} with {n} blocks; use 0..{n - 1} (resid_post of block L)"
        )


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text (special tokens included, truncated); returns also how many were cut."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in enc)
    return [ids[:max_length] for ids in enc], cut


def make_batches(ids: list[list[int]], batch_tokens: int, pad_id: int, max_padding: float = 0.1) -> Iterator[Batch]:
    """Sort by length (longest first) and pack under a padded-token budget.

    A batch also closes early, once it holds a quarter of the budget, when the next text would be
    padded by more than ``max_padding`` of the batch's longest: padding is computed and thrown away
    (on the bench texts it fell from 7% to 3% of the tokens through the model).
    """
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    start = 0
    while start < len(order):
        longest = len(ids[order[start]])
        size = max(1, batch_tokens // max(1, longest))
        stop = start + 1
        while stop < min(start + size, len(order)):
            if len(ids[order[stop]]) < (1.0 - max_padding) * longest and (stop - start) * longest >= batch_tokens // 4:
                break
            stop += 1
        chunk = order[start:stop]
        start = stop
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for b, i in enumerate(chunk):
            n = len(ids[i])
            input_ids[b, :n] = torch.tensor(ids[i], dtype=torch.long)
            mask[b, :n] = 1
        yield Batch(np.asarray(chunk, dtype=np.int64), input_ids, mask)


def forward_layers(loaded: LoadedModel, layers: Sequence[int], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, **extra: torch.Tensor) -> dict[int, torch.Tensor]:
    """Outputs of the requested blocks for one batch; stops after the deepest block.

    ``extra`` goes to the model as is (a vision-language model's pixel_values and token_type_ids).
    """
    blocks = decoder_layers(loaded.model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured[layer] = hidden.detach()
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        # A batch without padding needs no mask: the model then builds only its causal mask and
        # attention can take its causal fast path.
        mask = None if bool(attention_mask.all()) and not extra else attention_mask.to(loaded.device)
        with torch.inference_mode():
            loaded.model.base_model(input_ids=input_ids.to(loaded.device), attention_mask=mask, use_cache=False,
                                    **{k: v.to(loaded.device) for k, v in extra.items()})
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(layers) - set(captured)
    if missing:
        raise ModelError(f"layers {sorted(missing)} produced no output; the model skipped them")
    return captured


def special_ids(tokenizer: Any) -> np.ndarray:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            ids.add(int(v))
    return np.asarray(sorted(ids), dtype=np.int64)


# --------------------------------------------------------------------------- cache


class HiddenCache:
    """One (model, layer, dataset contents, max_length) folder: shards + a manifest written last."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"hidden-state cache {str(self.path)!r} has no readable manifest ({err})") from None

    def is_valid(self, deep: bool = True) -> bool:
        """True when complete; with ``deep`` every shard's checksum is verified too."""
        try:
            man = self.manifest()
        except CacheError:
            return False
        for shard in man.get("shards", []):
            f = self.path / shard["file"]
            if not f.exists() or f.stat().st_size != shard["bytes"]:
                return False
            if deep and file_sha256(f) != shard["sha256"]:
                return False
        return True

    def iter_shards(self) -> Iterator[ActivationShard]:
        for shard in self.manifest()["shards"]:
            f = self.path / shard["file"]
            try:
                t = load_file(str(f))
            except Exception as err:  # noqa: BLE001 - any read failure means a broken cache
                raise CacheError(f"hidden-state shard {str(f)!r} is unreadable ({err}); delete the folder to recompute") from None
            yield ActivationShard(
                rows=t["rows"], offsets=t["offsets"], acts=t["acts"],
                token_ids=t["token_ids"], real_mask=t["real_mask"].astype(bool),
                image_mask=t["image_mask"].astype(bool) if "image_mask" in t else None,
            )

    def load_all(self) -> ActivationShard:
        """Every text in dataset order (tests and small sets; big sets should stream)."""
        shards = list(self.iter_shards())
        n = sum(s.n_texts for s in shards)
        per_text: list[tuple[np.ndarray, ...] | None] = [None] * n
        images = all(s.image_mask is not None for s in shards) and bool(shards)
        for s in shards:
            for j, row in enumerate(s.rows):
                a, b = s.offsets[j], s.offsets[j + 1]
                per_text[int(row)] = (s.acts[a:b], s.token_ids[a:b], s.real_mask[a:b]) + (
                    (s.image_mask[a:b],) if images else ())  # type: ignore[index]
        lengths = np.asarray([len(p[1]) for p in per_text if p is not None], dtype=np.int64)
        if len(lengths) != n:
            raise CacheError(f"hidden-state cache {str(self.path)!r} is missing rows; delete it to recompute")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return ActivationShard(
            rows=np.arange(n, dtype=np.int64), offsets=offsets,
            acts=np.concatenate([p[0] for p in per_text]),  # type: ignore[index]
            token_ids=np.concatenate([p[1] for p in per_text]),  # type: ignore[index]
            real_mask=np.concatenate([p[2] for p in per_text]),  # type: ignore[index]
            image_mask=np.concatenate([p[3] for p in per_text]) if images else None,  # type: ignore[index]
        )


class _ShardWriter:
    """Buffers a layer's packed (padding-free) tokens and flushes shards of roughly ``shard_tokens`` tokens.

    Only the current shard is held in memory, so extraction memory does not grow with the dataset:
    each batch arrives packed to its texts' tokens (padding already dropped).
    """

    def __init__(self, folder: Path, shard_tokens: int):
        self.folder = folder
        self.shard_tokens = shard_tokens
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.buffered = 0
        self.max_abs = 0.0
        self.shards: list[dict[str, Any]] = []

    def add(self, rows: np.ndarray, lengths: np.ndarray, acts: np.ndarray, ids: np.ndarray, real: np.ndarray,
            image: np.ndarray | None = None) -> None:
        """One batch: ``acts`` [lengths.sum(), d] holds the texts of ``rows`` back to back."""
        self.parts.append((rows, lengths, acts, ids, real) + ((image,) if image is not None else ()))
        peak = float(np.abs(acts).max(initial=0.0))  # per batch: no shard-sized temporary
        self.max_abs = max(self.max_abs, peak if np.isfinite(peak) else float("inf"))  # NaN/inf -> fp32, as before
        self.buffered += int(lengths.sum())
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        parts, self.parts, self.buffered = self.parts, [], 0
        dtype = np.float16 if self.max_abs < FP16_MAX else np.float32
        self.max_abs = 0.0
        rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
        lengths = np.concatenate([p[1] for p in parts]).astype(np.int64)
        token_ids = np.concatenate([p[3] for p in parts]).astype(np.int32)
        real_mask = np.concatenate([p[4] for p in parts]).astype(np.uint8)
        image = {"image_mask": np.concatenate([p[5] for p in parts]).astype(np.uint8)} if len(parts[0]) > 5 else {}
        # Fill the shard's array batch by batch (casting on the way), freeing each fp32 batch as it is
        # copied: the peak is the buffer plus one fp16 shard, never an fp32 copy of the whole shard.
        store = np.empty((int(lengths.sum()), parts[0][2].shape[1]), dtype=dtype)
        at = 0
        while parts:
            acts = parts.pop(0)[2]
            store[at:at + len(acts)] = acts
            at += len(acts)
            del acts
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        save_file({
            "rows": rows,
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "acts": store,
            "token_ids": token_ids,
            "real_mask": real_mask,
            **image,
        }, str(path))
        self.shards.append({"file": name, "texts": len(rows), "tokens": int(lengths.sum()),
                            "bytes": path.stat().st_size, "sha256": file_sha256(path), "dtype": str(store.dtype)})


def extract_to_cache(
    loaded: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int],
    targets: dict[int, Path],
    *,
    max_length: int,
    batch_tokens: int,
    shard_tokens: int = 32768,
    extra_manifest: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    show_bar: bool = False,
) -> ExtractionStats:
    """Run one truncated forward over all texts and write one cache folder per layer.

    ``targets`` maps layer -> final folder; each is written into a temp folder and renamed only
    when complete, so a killed run never leaves a folder that looks valid.
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    layers = sorted(set(layers))
    check_layers(loaded, layers)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    specials = special_ids(tok)
    ids, cut = tokenize(tok, texts, max_length)
    stats = ExtractionStats(texts=len(texts), truncated_texts=cut, layers=list(layers))
    t0 = time.perf_counter()
    with ExitStack() as stack:
        folders = {layer: stack.enter_context(atomic_dir(targets[layer])) for layer in layers}
        stack.enter_context(fused_blocks(loaded, max(layers), batch_tokens))
        writers = {layer: _ShardWriter(folders[layer], shard_tokens) for layer in layers}
        bar = tqdm(total=stats.texts, desc=f"{loaded.name} L{','.join(map(str, layers))}", unit="text",
                   disable=not show_bar, leave=False)
        done = 0
        for batch in make_batches(ids, batch_tokens, pad_id):  # lazily: one padded batch at a time
            outs = forward_layers(loaded, layers, batch.input_ids, batch.attention_mask)
            stats.forward_calls += 1
            stats.batches += 1
            keep = batch.attention_mask.bool()  # [B, T]; row-major order = texts back to back
            lengths = keep.sum(dim=1).numpy().astype(np.int64)
            tok_ids = batch.input_ids[keep].numpy().astype(np.int32)
            real = ~np.isin(tok_ids, specials)
            for layer in layers:
                h = outs[layer][keep.to(outs[layer].device)]  # [tokens, d]: padding dropped before the copy
                writers[layer].add(batch.rows, lengths, h.float().cpu().numpy(), tok_ids, real)
            del outs
            stats.tokens += int(lengths.sum())
            stats.real_tokens += int(real.sum())
            done += len(batch.rows)
            bar.update(len(batch.rows))
            if progress:
                progress(done, stats.texts)
        bar.close()
        stats.seconds = time.perf_counter() - t0
        for layer in layers:
            writers[layer].flush()
            manifest = {
                "version": HIDDEN_CACHE_VERSION, "model": loaded.name, "hf_name": loaded.hf_name,
                "fingerprint": loaded.fingerprint, "layer": layer, "hook": f"model.layers.{layer} (resid_post)",
                "d_model": loaded.d_model, "max_length": max_length, "texts": stats.texts,
                "tokens": stats.tokens, "real_tokens": stats.real_tokens, "shards": writers[layer].shards,
                "seconds": stats.seconds, **(extra_manifest or {}),
            }
            (folders[layer] / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return stats
