"""Greedy decoding over a cache the caller prefilled (the eval runner's decode loop)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_continue(
    model: torch.nn.Module,
    cache: object,
    first_logits: torch.Tensor,
    prompt_len: int,
    max_new_tokens: int,
    eos_ids: set[int],
) -> list[int]:
    """Greedy tokens after a prefill that left `cache` filled and produced `first_logits`.

    first_logits: [vocab] float, the logits at the last prompt position.
    Position ids continue from `prompt_len` even when the cache holds fewer tokens (kvpress presses
    evict tokens but keep the original positions).
    """
    out: list[int] = []
    token = int(first_logits.argmax())
    device = first_logits.device
    for step in range(max_new_tokens):
        if token in eos_ids:
            break
        out.append(token)
        if step == max_new_tokens - 1:
            break
        ids = torch.tensor([[token]], device=device)
        pos = torch.tensor([[prompt_len + step]], device=device)
        logits = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
    return out


def eos_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
    """Token ids that end an answer: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
    return ids
