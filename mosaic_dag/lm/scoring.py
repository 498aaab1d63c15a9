"""Score text continuations with a causal LM: option log-probabilities after a prompt, batched and deterministic.

Shared by the behaviour labels (mosaic_dag.data.behaviour), the LM judge and the interventions. The
caller's tokenizer is never mutated: batches are padded here (right for scoring).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["build_prompts", "option_logprobs"]


# --------------------------------------------------------------------------- tokenisation helpers


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    """Pad id for building batches; any id works because padded positions are masked."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    if size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {size}")
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _by_length(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by length (stable), so batches waste little padding and order is fixed."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def build_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> tuple[list[str], bool]:
    """Wrap prompts in the tokenizer's chat template when asked and available.

    Returns the texts and whether the template was applied (templated texts already hold
    BOS and must be encoded without special tokens).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not chat or not template:
        return list(prompts), False
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        out.append(str(text))
    return out, True


# --------------------------------------------------------------------------- scoring options


def _final_hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state (after the final norm) without computing logits for every position."""
    base = getattr(model, "base_model", None)
    if base is None or base is model or model.get_output_embeddings() is None:
        raise ValueError("model: needs a causal LM with a separate output head")
    return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 squashes logits; the full forward would too
        logits = torch.tanh(logits / cap) * cap
    return logits


def option_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    batch_size: int = 8,
    *,
    max_length: int | None = None,
) -> np.ndarray:
    """Summed log-probability of each option's tokens continuing its prompt.

    The prompt is encoded with the tokenizer's special tokens (BOS), the option without, and
    the two id lists are concatenated, so options are scored on the same tokens whatever the
    prompt; write options with their leading space (" yes") for BPE tokenizers. Batches are
    right-padded (real tokens keep positions 0..n-1). Returns float64 ``[n_prompts,
    max_options]``; cells past a prompt's own option count are NaN. ``max_length`` cuts the
    prompt from the left so prompt + option fits.
    """
    if len(prompts) != len(options):
        raise ValueError(f"options: got {len(options)} option lists for {len(prompts)} prompts")
    width = max((len(o) for o in options), default=0)
    out = np.full((len(prompts), width), np.nan, dtype=np.float64)
    pairs: list[tuple[int, int, list[int], int]] = []  # (prompt idx, option idx, ids, n_prompt)
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        if not opts:
            raise ValueError(f"options[{i}]: is empty; every prompt needs at least one option")
        p_ids = _encode(tokenizer, prompt, special=True)
        for j, opt in enumerate(opts):
            o_ids = _encode(tokenizer, opt, special=False)
            if not o_ids:
                raise ValueError(f"options[{i}][{j}]: {opt!r} encodes to no tokens")
            ctx = p_ids
            if max_length is not None and len(ctx) + len(o_ids) > max_length:
                keep = max(1, max_length - len(o_ids))
                ctx = ctx[-keep:]
            if not ctx:
                raise ValueError(f"prompts[{i}]: encodes to no tokens and the tokenizer adds no BOS")
            pairs.append((i, j, ctx + o_ids, len(ctx)))
    if not pairs:
        return out
    device = _device(model)
    pad = _pad_id(tokenizer)
    order = _by_length([len(p[2]) for p in pairs])
    with torch.inference_mode():
        for batch in _batches(order, batch_size):
            longest = max(len(pairs[k][2]) for k in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for r, k in enumerate(batch):
                seq = pairs[k][2]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            # the vocabulary projection is the costly part (262k rows for Gemma): apply it only at
            # the positions that predict option tokens, not at every prompt position
            hidden = _final_hidden(model, ids.to(device), mask.to(device))
            for r, k in enumerate(batch):
                i, j, seq, n_ctx = pairs[k]
                pos = torch.arange(n_ctx - 1, len(seq) - 1, device=device)  # token t is predicted at t - 1
                logp = torch.log_softmax(_head_logits(model, hidden[r, pos]), dim=-1)
                target = ids[r, pos.cpu() + 1].to(device)
                out[i, j] = float(logp.gather(-1, target.unsqueeze(-1)).double().sum())
    return out
