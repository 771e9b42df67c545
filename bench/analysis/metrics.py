"""Accuracy metrics and memory matching shared by the analysis scripts."""

from typing import Any

import torch
from mosaickv.core import CompressionMethod, KVCache, make_method


def full_attention(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float32. k, v: [T, H_kv, D]; q: [H_q, D] -> (out [H_q, D], probs [H_q, T])."""
    g = q.shape[0] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1).transpose(0, 1)
    vv = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    probs = torch.softmax(torch.einsum("hd,htd->ht", q.float(), kk) * k.shape[-1] ** -0.5, dim=-1)
    return torch.einsum("ht,htd->hd", probs, vv), probs


def evaluate(cache: KVCache, x: dict[str, Any]) -> dict[str, float]:
    """Mean over the decode queries of the relative output error ||o - o_full|| / ||o_full|| and of the
    attention-mass recall: the exact attention probability that falls on the tokens attend() reads."""
    errors, recalls = [], []
    g = x["queries"].shape[1] // x["k"].shape[1]
    for q in x["queries"]:
        ref, probs = full_attention(x["k"], x["v"], q)
        out = cache.attend(q).float()
        errors.append(float((out - ref).norm() / ref.norm()))
        mask = cache.attended_mask(q).repeat_interleave(g, dim=0)
        recalls.append(float((probs * mask).sum(-1).mean()))
    return {"rel_error": sum(errors) / len(errors), "recall": sum(recalls) / len(recalls),
            "bytes": cache.nbytes}


def match_memory(name: str, params: dict[str, Any], x: dict[str, Any], target: int, keeps: list[int]
                 ) -> tuple[CompressionMethod, KVCache]:
    """The largest keep (channels per vector, from ``keeps`` ascending) whose cache fits in ``target``
    bytes; binary search, since bytes grow with keep. Falls back to the smallest keep."""
    d = x["k"].shape[-1]

    def build(keep: int) -> tuple[CompressionMethod, KVCache]:
        method = make_method(name, **params, keep_ratio=keep / d)
        return method, method.encode(x["k"], x["v"], q_window=x["q_window"])

    lo, hi = 0, len(keeps) - 1
    best = build(keeps[0])
    while lo <= hi:
        mid = (lo + hi) // 2
        found = build(keeps[mid])
        if found[1].nbytes <= target:
            best, lo = found, mid + 1
        else:
            hi = mid - 1
    return best
