"""Inputs for the analysis scripts: structured synthetic KV and KV captured from SmolLM2-135M.

Every input is a dict: k, v [T, H_kv, D] (post-RoPE), q_window [w, H_q, D] (last prompt queries,
for ThinK), queries [n, H_q, D] (decode queries to evaluate), name.
"""

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding (pairs i, i + D/2): x [T, H, D], positions [T]."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2 / d)
    angles = positions[:, None].float() * freqs[None]  # [T, D/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _low_rank_with_outliers(t: int, h: int, d: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Per head: rank-r signal with decaying spectrum + noise + 3 outlier channels per vector that
    differ from vector to vector (heavy-tailed magnitudes), as in real K/V caches."""
    basis = torch.linalg.qr(torch.randn(h, d, rank, generator=gen)).Q.transpose(1, 2)  # [H, r, D]
    coeff = torch.randn(t, h, rank, generator=gen) * torch.logspace(0.8, -0.5, rank)
    x = torch.einsum("thr,hrd->thd", coeff, basis) + 0.15 * torch.randn(t, h, d, generator=gen)
    chans = torch.randint(0, d, (t, h, 3), generator=gen)
    # Student-t (2 dof) from the seeded generator: Z / sqrt(chi2_2 / 2), chi2_2 / 2 = -log U
    u = torch.rand(t, h, 3, generator=gen).clamp(min=1e-12)
    mags = torch.randn(t, h, 3, generator=gen) / (-u.log()).sqrt() * 1.5
    return x.scatter_add(2, chans, mags)


def synthetic(t: int = 4096, h_kv: int = 4, gqa: int = 4, d: int = 128, n_queries: int = 8,
              seed: int = 0) -> dict[str, Any]:
    """Structured synthetic KV: low rank + per-vector outliers, RoPE on keys and queries, and
    heavy-tailed attention (each query points at a few "needle" keys on top of a shared direction)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(t)
    k = _rope(_low_rank_with_outliers(t, h_kv, d, 12, gen), pos)
    v = _low_rank_with_outliers(t, h_kv, d, 12, gen)

    def make_queries(n: int) -> torch.Tensor:
        needles = torch.randint(0, t, (n, h_kv * gqa, 4), generator=gen)
        heads = torch.arange(h_kv * gqa) // gqa
        target = k[needles, heads[None, :, None]]  # [n, H_q, 4, D]
        weights = torch.rand(n, h_kv * gqa, 4, 1, generator=gen) * 1.5 + 0.5
        direction = (weights * target / target.norm(dim=-1, keepdim=True)).sum(2)
        diffuse = k.mean(0)[heads] / k.mean(0)[heads].norm(dim=-1, keepdim=True)
        # needle logits q.k / sqrt(D) land around 2-8 over a diffuse background: heavy-tailed attention
        return 4.0 * direction + 2.0 * diffuse + 0.3 * torch.randn(n, h_kv * gqa, d, generator=gen)

    bf16 = torch.bfloat16  # the storage dtype of serving
    return {"name": f"synthetic T={t} H_kv={h_kv} H_q={h_kv * gqa} D={d}", "k": k.to(bf16), "v": v.to(bf16),
            "q_window": make_queries(32).to(bf16), "queries": make_queries(n_queries).to(bf16)}


def prose(chars: int) -> str:
    """Deterministic English prose that ships with Python: stdlib docstrings."""
    import argparse
    import collections
    import functools
    import itertools
    import json
    import logging
    import pathlib
    import subprocess
    import textwrap
    import unittest

    text = []
    for mod in (argparse, collections, functools, itertools, pathlib, subprocess, logging, unittest, json,
                textwrap):
        text.append(inspect.getdoc(mod) or "")
        for name, obj in inspect.getmembers(mod):
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                text.append(inspect.getdoc(obj) or "")
    return "\n".join(text)[:chars]


def smollm2(n_tokens: int = 3072, layers: tuple[int, ...] = (3, 10, 20, 27), n_queries: int = 8,
            window: int = 32) -> list[dict[str, Any]]:
    """Post-RoPE K/V and queries captured from SmolLM2-135M-Instruct over stdlib prose.

    K/V come from the DynamicCache after one forward pass over n_tokens + n_queries tokens (cast to
    bfloat16, the storage dtype of serving); the queries are recomputed from each layer's input
    with the layer's own q_proj and rotary embedding: the last n_queries positions are evaluated
    as decode queries over the cache of the tokens before them, the window before that is q_window.
    """
    from mosaickv.engines.hf.models import load_model
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tok = load_model("smollm2-135m", "cpu")
    ids = tok(prose(40 * n_tokens), return_tensors="pt").input_ids[:, : n_tokens + n_queries]
    if ids.shape[1] < n_tokens + n_queries:
        raise ValueError(f"prose gave only {ids.shape[1]} tokens, need {n_tokens + n_queries}")
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def run(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden).view(1, hidden.shape[1], -1, module.head_dim).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            captured[layer] = q[0].transpose(0, 1).detach()  # [T, H_q, D]
        return run

    handles = [model.model.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i in layers]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    for hd in handles:
        hd.remove()
    inputs = []
    for i in layers:
        layer_cache = out.past_key_values.layers[i]
        k = layer_cache.keys[0].transpose(0, 1)[:n_tokens].to(torch.bfloat16)  # [T, H_kv, D]
        v = layer_cache.values[0].transpose(0, 1)[:n_tokens].to(torch.bfloat16)
        q = captured[i].to(torch.bfloat16)
        inputs.append({"name": f"smollm2-135m layer {i} T={n_tokens}", "k": k, "v": v,
                       "q_window": q[n_tokens - window:n_tokens], "queries": q[n_tokens:]})
    return inputs


def to_device(x: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in x.items()}


def load_captured(path: str) -> list[dict[str, Any]]:
    """Inputs saved by ``python bench/analysis/inputs.py --capture PATH`` (runs without the model)."""
    return torch.load(path, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="capture SmolLM2-135M K/V/queries to a file")
    parser.add_argument("--capture", required=True, help="output .pt path")
    parser.add_argument("--tokens", type=int, default=3072)
    args = parser.parse_args()
    Path(args.capture).parent.mkdir(parents=True, exist_ok=True)
    torch.save(smollm2(n_tokens=args.tokens), args.capture)
    print(f"wrote {args.capture}")


if __name__ == "__main__":
    main()
