"""Perplexity on long natural text beyond the compressed span, full vs compressed (EVAL.md).

A window of the shipped essay is split into a context of ``ctx`` tokens (prefilled, then compressed
by the method) and a continuation of ``cont`` tokens, fed one at a time (teacher forcing) through the
compressed cache, exactly as decode reads it. The loss is on the continuation tokens only, so every
scored position attends over the compressed context.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from transformers import PreTrainedModel

from mosaickv.engines.hf.backends import KVBackend
from mosaickv.eval.methods import prefill
from mosaickv.eval.tasks import essay_text


@lru_cache(maxsize=4)
def _essay_ids(tokenizer: object) -> tuple[int, ...]:
    return tuple(tokenizer.encode(essay_text(), add_special_tokens=False))  # type: ignore[attr-defined]


def windows(tokenizer: object, ctx: int, cont: int, n: int) -> list[list[int]]:
    """n windows of ctx + cont essay tokens, starting at offsets spread evenly over the text."""
    ids = _essay_ids(tokenizer)
    span = ctx + cont
    if span > len(ids):
        raise ValueError(f"ctx + cont = {span} tokens exceeds the essay's {len(ids)} tokens")
    if n < 1:
        raise ValueError(f"need at least one window, got {n}")
    step = (len(ids) - span) // n
    return [list(ids[i * step : i * step + span]) for i in range(n)]


@torch.inference_mode()
def continuation_nll(model: PreTrainedModel, backend: KVBackend, window: list[int], ctx: int) -> list[float]:
    """Negative log-likelihood (nats) of each token of window[ctx:] given everything before it, with the
    first ctx tokens held in `backend`'s (compressed) cache."""
    device = model.device
    p = prefill(model, backend, torch.tensor([window[:ctx]], device=device))
    logits = p.logits
    nll = []
    try:
        for offset, token in enumerate(window[ctx:]):
            nll.append(float(-torch.log_softmax(logits.float(), dim=-1)[token]))
            if offset == len(window) - ctx - 1:
                break
            ids = torch.tensor([[token]], device=device)
            pos = torch.tensor([[ctx + offset]], device=device)
            logits = model(input_ids=ids, position_ids=pos, cache=p.cache, use_cache=True).logits[0, -1]
    finally:
        backend.release_cache(p.cache)
    return nll


def perplexity(model: PreTrainedModel, backend: KVBackend, wins: list[list[int]], ctx: int) -> float:
    """exp(mean NLL) over the continuation tokens of every window."""
    nll = [x for w in wins for x in continuation_nll(model, backend, w, ctx)]
    return math.exp(sum(nll) / len(nll))
