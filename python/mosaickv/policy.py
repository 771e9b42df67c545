"""Planner telemetry: per layer and KV head, the energy a mosaic segment loses at each keep ratio.

From a prompt's real post-RoPE K and V (the HF cache after prefill), each head's vectors are rotated
by the eigenvectors of their uncentred second moment (what a segment's encoder does,
docs/FORMAT.md section 2.2) and the relative energy not kept by the top-k elements is read off one
sort per head (``energy_losses``). The JSON written here is what ``mosaickv plan --telemetry`` reads
(src/policy/planner.ts, ``Telemetry``).

    python -m mosaickv.policy --model smollm2-135m --tokens 1024 > telemetry.json
    python -m mosaickv.policy --model smollm2-135m --shape      # layers, KV heads, head_dim, dtype only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from typing import Any

import torch

from mosaickv.core import KVCache, make_method
from mosaickv.core.rotation import rotation_from_moment
from mosaickv.core.strategy import energy_losses, fixed_strategy

# The planner's candidates (src/policy/planner.ts PLAN_KEEP_RATIOS).
PLAN_KEEP_RATIOS = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75)
# Token ratios at which decode-step recall is measured: the planner picks, per layer, the smallest
# one whose recall reaches its minRecall (0.1 is the paper's and the methods' default).
RECALL_TOKEN_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5)
# Prompt queries the attention losses read: the last 32 (ThinK's observation window, which the hf
# backend records per layer anyway).
QUERY_WINDOW = 32
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def check_policy(heads: list[dict[str, Any]], n_layers: int, n_kv_heads: int) -> None:
    """Raises ValueError unless ``heads`` (a ``policy`` message's) names every layer x KV head of the
    model exactly once."""
    seen: set[tuple[int, int]] = set()
    for h in heads:
        key = (h["layer"], h["head"])
        if not (0 <= key[0] < n_layers and 0 <= key[1] < n_kv_heads):
            raise ValueError(
                f"layer {key[0]} head {key[1]} is outside the model "
                f"({n_layers} layers x {n_kv_heads} KV heads)"
            )
        if key in seen:
            raise ValueError(f"layer {key[0]} head {key[1]} appears twice")
        seen.add(key)
    if len(seen) != n_layers * n_kv_heads:
        raise ValueError(
            f"the policy covers {len(seen)} of the model's {n_layers} x {n_kv_heads} layer/KV-head pairs; "
            "it must name every one"
        )


def layer_params(heads: list[dict[str, Any]], n_layers: int, n_kv_heads: int) -> dict[int, dict[str, Any]]:
    """A policy's heads (wire form: layer, head, keep_ratio, token_ratio) as mosaic parameters per
    layer: one keep ratio per KV head (``head_keep_ratios``) and the layer's token ratio, which its
    heads must share (block selection runs once per layer step)."""
    check_policy(heads, n_layers, n_kv_heads)
    out: dict[int, dict[str, Any]] = {}
    for layer in range(n_layers):
        mine = sorted((h for h in heads if h["layer"] == layer), key=lambda h: h["head"])
        token_ratios = {h["token_ratio"] for h in mine}
        if len(token_ratios) > 1:
            raise ValueError(
                f"layer {layer} asks for different token ratios per head {sorted(token_ratios)}; "
                "a layer selects blocks with one token ratio"
            )
        keeps = tuple(float(h["keep_ratio"]) for h in mine)
        out[layer] = {
            "keep_ratio": max(keeps),
            "head_keep_ratios": keeps,
            "token_ratio": mine[0]["token_ratio"],
        }
    return out


def read_plan(path: str, n_layers: int, n_kv_heads: int) -> dict[int, dict[str, Any]]:
    """``layer_params`` of a plan file written by ``mosaickv plan --json`` (camelCase heads)."""
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    heads = [
        {"layer": h["layer"], "head": h["head"], "keep_ratio": h["keepRatio"], "token_ratio": h["tokenRatio"]}
        for h in plan["heads"]
    ]
    return layer_params(heads, n_layers, n_kv_heads)


def head_losses(x: torch.Tensor, keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS) -> torch.Tensor:
    """Energy not kept per head and keep ratio, after each head's own rotation (group g = 1).

    Args:
        x: [H_kv, T, D] any float dtype: one side (K or V) of one layer for one sequence.
    Returns:
        [H_kv, len(keep_ratios)] float64 losses in [0, 1].
    """
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"x must be [H_kv, T, D] with T >= 1, got shape {tuple(x.shape)}")
    xf = x.float()
    d = xf.shape[2]
    rot = rotation_from_moment(xf.transpose(1, 2) @ xf)  # [H, D, D]
    strategies = [fixed_strategy(d, r, 1, None) for r in keep_ratios]
    return torch.stack([energy_losses(xf[h] @ rot[h].T, strategies) for h in range(xf.shape[0])])


def kv_energy_losses(
    k: torch.Tensor, v: torch.Tensor, keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS
) -> torch.Tensor:
    """``head_losses`` of K and V averaged (a plan sets one keep ratio for both): k, v [H_kv, T, D]
    -> [H_kv, len(keep_ratios)]."""
    return (head_losses(k, keep_ratios) + head_losses(v, keep_ratios)) / 2


def decompressed_side(cache: KVCache, which: str) -> torch.Tensor:
    """One side (``"k"`` or ``"v"``) of a cache as attention sees it, back in original coordinates:
    [T, H_kv, D] float32, token order (sinks, segments, tail)."""
    sink, tail = (cache.sink_k, cache.tail_k) if which == "k" else (cache.sink_v, cache.tail_v)
    segs = [
        torch.stack([getattr(seg, which).unpack(h) for h in range(cache.n_kv_heads)], 1)
        for seg in cache.segments
    ]
    return torch.cat([sink.float(), *segs, tail.float()])


def decompressed(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache's K/V as attention sees them, back in original coordinates: [T, H_kv, D] float32 each.

    Packed attention over a segment equals dense attention over its decompressed rows (it only skips
    the zeros), so this gives the exact output of a cache without block selection.
    """
    return decompressed_side(cache, "k"), decompressed_side(cache, "v")


def decode_recall(
    cache: KVCache,
    q: torch.Tensor,
    scale: float | None = None,
    token_ratios: tuple[float, ...] = RECALL_TOKEN_RATIOS,
) -> torch.Tensor:
    """Attention-mass recall of block selection for one decode query, per KV head and token ratio.

    Full attention of ``q`` over the whole cache (every block) is computed on the decompressed keys:
    the original keys are gone once a segment is encoded, so "full attention" here is the mosaic
    cache's own keys without block selection. Recall at ratio r is the softmax mass that lands on
    the positions the cache's own selection reads at r (``KVCache.attended_mask``: the top blocks
    ∪ sinks ∪ dense tail), averaged over the head's GQA query heads. 1 means selection misses
    nothing.

    Args:
        cache: one layer's core cache of one sequence; its method must select blocks (it stores
            block summaries).
        q: [H_q, D] the step's post-RoPE query; scale: softmax scale, default D ** -0.5.
    Returns:
        [H_kv, len(token_ratios)] float64 in [0, 1].
    """
    if not cache.method.selects_blocks:
        raise ValueError("decode_recall needs a cache that selects blocks (token_ratio < 1)")
    h, d = cache.n_kv_heads, cache.dim
    scale = d**-0.5 if scale is None else float(scale)
    keys = decompressed_side(cache, "k")  # [T, H_kv, D]
    qg = q.float().reshape(h, -1, d)  # [H_kv, G, D]
    weights = torch.softmax(torch.einsum("hgd,thd->hgt", qg, keys) * scale, -1)
    recalls = [
        (weights * cache.attended_mask(q, r)[:, None, :]).sum(-1).mean(-1).clamp(0.0, 1.0).double()
        for r in token_ratios
    ]
    return torch.stack(recalls, 1)


def attention_losses(
    k: torch.Tensor,
    v: torch.Tensor,
    q_window: torch.Tensor,
    keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS,
    **method_params: Any,
) -> torch.Tensor:
    """Relative squared error of the attention output per KV head and keep ratio.

    The prompt's last queries (``q_window``, what the decode queries resemble) attend over the
    prompt's K/V as a mosaic cache at each keep ratio stores them, against the exact K/V:
    sum ||o - o_hat||^2 / sum ||o||^2 over the window and the head's GQA group, clamped to 1. Unlike
    the energy loss this sees which elements the queries read, so it finds the retrieval heads that
    need precise keys.

    Args:
        k, v: [T, H_kv, D] one layer's post-RoPE prompt K/V; q_window: [w, H_q, D].
        method_params: mosaic parameters besides keep_ratio (token selection is switched off: this
            measures the element dimension only).
    Returns:
        [H_kv, len(keep_ratios)] float64 in [0, 1].
    """
    t, h, d = k.shape
    q = q_window.float().reshape(q_window.shape[0], h, -1, d).permute(1, 2, 0, 3)  # [H, G, w, D]

    def out(kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        kh, vh = kk.float().permute(1, 0, 2)[:, None], vv.float().permute(1, 0, 2)[:, None]  # [H, 1, T, D]
        return torch.softmax(q @ kh.transpose(-1, -2) * d**-0.5, -1) @ vh  # [H, G, w, D]

    exact = out(k, v)
    norm = exact.pow(2).sum((1, 2, 3)).clamp_min(1e-30)
    params = {"segment_len": max(t, 1), **method_params, "token_ratio": 1.0}
    losses = []
    for r in keep_ratios:
        cache = make_method("mosaic", **params, keep_ratio=r).encode(k, v, q_window=q_window)
        err = (out(*decompressed(cache)) - exact).pow(2).sum((1, 2, 3)) / norm
        losses.append(err.clamp(max=1.0).double())
    return torch.stack(losses, 1)


def head_curves(losses: torch.Tensor, energy: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """[L, H_kv, n_ratios] losses (and optionally the energy losses, same shape) -> the planner's
    curves ({layer, head, loss[, energy]}), 6 digits."""

    def digits(x: torch.Tensor) -> list[float]:
        return [round(float(v), 6) for v in x]

    return [
        {"layer": layer, "head": h, "loss": digits(losses[layer, h])}
        | ({"energy": digits(energy[layer, h])} if energy is not None else {})
        for layer in range(losses.shape[0])
        for h in range(losses.shape[1])
    ]


def prompt_curves(
    k: torch.Tensor,
    v: torch.Tensor,
    q_window: torch.Tensor,
    keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS,
) -> torch.Tensor:
    """One layer's online telemetry from its prompt (k, v: [T, H_kv, D]; q_window: [w, H_q, D]):
    [2, H_kv, n_ratios] = (``attention_losses``, ``kv_energy_losses``)."""
    return torch.stack(
        [
            attention_losses(k, v, q_window, keep_ratios),
            kv_energy_losses(k.transpose(0, 1), v.transpose(0, 1), keep_ratios),
        ]
    )


def head_recalls(layers: list[int], recalls: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per measured layer, [H_kv, n_ratios] recalls -> a ``recall`` message's heads ({layer, head,
    recall}), 6 digits."""
    return [
        {"layer": layer, "head": h, "recall": [round(float(x), 6) for x in r[h]]}
        for layer, r in zip(layers, recalls, strict=True)
        for h in range(r.shape[0])
    ]


def telemetry_body(
    curves: torch.Tensor, head_dim: int, dtype: str, tokens: int, seconds: float
) -> dict[str, Any]:
    """A ``telemetry`` message without worker_id and model (its sender adds them): curves
    [L, 2, H_kv, n_ratios] of ``prompt_curves`` per layer at PLAN_KEEP_RATIOS."""
    return {
        "type": "telemetry",
        "head_dim": head_dim,
        "dtype": dtype,
        "keep_ratios": list(PLAN_KEEP_RATIOS),
        "curves": head_curves(curves[:, 0], curves[:, 1]),
        "tokens": tokens,
        "overhead_s": seconds,
    }


def recall_body(
    layers: list[int], recalls: list[torch.Tensor], tokens: int, seconds: float
) -> dict[str, Any]:
    """A ``recall`` message without worker_id and model: per measured layer, [H_kv, n_ratios] recalls
    of ``decode_recall`` at RECALL_TOKEN_RATIOS."""
    return {
        "type": "recall",
        "token_ratios": list(RECALL_TOKEN_RATIOS),
        "heads": head_recalls(layers, recalls),
        "tokens": tokens,
        "overhead_s": seconds,
    }


def model_shape(model: Any, name: str) -> dict[str, Any]:
    """Layers, KV heads, head_dim and storage dtype of a loaded HF causal LM."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "model": name,
        "nLayers": cfg.num_hidden_layers,
        "nKvHeads": getattr(cfg, "num_key_value_heads", None) or heads,
        "headDim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "dtype": DTYPE_NAMES[next(model.parameters()).dtype],
    }


def shape_json(name: str) -> str:
    """``model_shape`` of a registered model or local directory, as JSON (for Node through pythonia)."""
    from mosaickv.engines.hf.models import load_model

    model, _ = load_model(name)
    return json.dumps(model_shape(model, name))


def telemetry(
    model: Any,
    tokenizer: Any,
    name: str,
    text: str,
    tokens: int,
    keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS,
) -> dict[str, Any]:
    """Prefills the first ``tokens`` tokens of ``text`` and measures every layer's curves.

    Returns the planner's Telemetry JSON (camelCase keys); ``overheadS`` is the curve computation
    alone, ``prefillS`` the forward pass it rides on.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(next(model.parameters()).device)
    if ids.shape[1] < 2:
        raise ValueError(f"the text gives {ids.shape[1]} tokens; the curves need at least 2")
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    t1 = time.perf_counter()
    # keys/values: [1, H_kv, T, D]
    losses = torch.stack(
        [kv_energy_losses(entry.keys[0], entry.values[0], keep_ratios) for entry in cache.layers]
    )
    curves = head_curves(losses)
    t2 = time.perf_counter()
    return {
        **model_shape(model, name),
        "keepRatios": list(keep_ratios),
        "curves": curves,
        "tokens": int(ids.shape[1]),
        "prefillS": round(t1 - t0, 4),
        "overheadS": round(t2 - t1, 4),
    }


def attention_telemetry(
    model: Any,
    tokenizer: Any,
    name: str,
    prompts: list[str],
    keep_ratios: tuple[float, ...] = PLAN_KEEP_RATIOS,
) -> dict[str, Any]:
    """Telemetry whose curves are ``attention_losses`` (averaged over ``prompts``) instead of energy
    (the energy losses ride along in each curve's ``energy``).

    Each prompt is prefilled with full attention through the mosaickv backend, which records every
    layer's post-RoPE K/V and the prompt's last queries. Calibrate on prompts like the workload's,
    but not the very prompts that are evaluated afterwards.
    """
    from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend, prefill_curves
    from mosaickv.eval.methods import installed

    backend = MosaicKVBackend({"method": "full"})
    total: torch.Tensor | None = None
    prefill_s = overhead_s = 0.0
    tokens = []
    with installed(backend, model), torch.no_grad():
        for text in prompts:
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=model.device)
            tokens.append(int(ids.shape[1]))
            cache = backend.new_cache(model)
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            curves = prefill_curves(cache.layers, keep_ratios)
            total = curves if total is None else total + curves
            prefill_s += t1 - t0
            overhead_s += time.perf_counter() - t1
    if total is None:
        raise ValueError("attention telemetry needs at least one prompt")
    mean = total / len(prompts)
    curves = head_curves(mean[:, 0], mean[:, 1])
    return {
        **model_shape(model, name),
        "keepRatios": list(keep_ratios),
        "curves": curves,
        "loss": "attention",
        "tokens": tokens,
        "prefillS": round(prefill_s, 4),
        "overheadS": round(overhead_s, 4),
    }


def sample_text() -> str:
    """The English essay shipped for the accuracy harness (python/mosaickv/eval/data)."""
    return resources.files("mosaickv.eval").joinpath("data/persuasion.txt").read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from mosaickv.engines.hf.models import load_model

    p = argparse.ArgumentParser(prog="python -m mosaickv.policy", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1024, help="prompt tokens to measure (default 1024)")
    p.add_argument("--shape", action="store_true", help="print only the model's shape (no forward pass)")
    p.add_argument(
        "--loss",
        choices=("energy", "attention"),
        default="energy",
        help="curves: energy not kept (cheap, any text) or the attention output error of the "
        "prompts' last queries (finds retrieval heads; needs --tasks)",
    )
    p.add_argument("--tasks", default="", help="attention loss: calibration prompts from these RULER tasks")
    p.add_argument("--ctx", type=int, default=4096, help="attention loss: calibration prompt length")
    p.add_argument("--samples", type=int, default=1, help="attention loss: prompts per task")
    p.add_argument("--seed", type=int, default=1, help="attention loss: task seed (evaluate on another)")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error(f"--tokens must be >= 2, got {args.tokens}")
    if args.shape:
        sys.stdout.write(shape_json(args.model) + "\n")
        return 0
    if args.loss == "attention" and not args.tasks:
        p.error("--loss attention needs --tasks (calibration prompts), e.g. --tasks niah_single_1")
    torch.set_num_threads(1)  # a shared 2-core box: one thread is faster than an oversubscribed pool
    model, tokenizer = load_model(args.model)
    if args.loss == "attention":
        from mosaickv.eval import tasks

        prompts = [
            s.prompt
            for t in args.tasks.split(",")
            if t
            for s in tasks.generate(t, args.samples, args.ctx, tokenizer, seed=args.seed)
        ]
        out = attention_telemetry(model, tokenizer, args.model, prompts)
    else:
        out = telemetry(model, tokenizer, args.model, sample_text(), args.tokens)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
