"""Where a compressed cache's real bytes go, per component, as a fraction of the dense cache.

    .venv/bin/python bench/accuracy/kv_breakdown.py --tokens 4051 --heads 3 --dim 64 --budget-ratio 3 \
        --method mosaic:segment_len=4096 --json bench/results/accuracy_smollm2_4k_bytes.json

Bytes depend on shapes and settings, not on the data, once keep_ratio is fixed: random K/V of one layer
(SmolLM2-135M's 3 KV heads x 64 by default) are encoded, keep_ratio is fitted to the budget with the
same bisection as the hf backend, and every tensor the cache holds is attributed to a component. Run
for float32 (the model's dtype on CPU here) and bfloat16 (its dtype on GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from mosaickv.core import KVCache, make_method
from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend, fit_keep_ratio


def breakdown(cache: KVCache) -> dict[str, int]:
    """Real bytes per component of one layer's cache, over the tensors cache.nbytes counts (a storage
    shared by two tensors counts once, as there)."""
    component: dict[int, str] = {}
    for t in (cache.sink_k, cache.sink_v, cache.tail_k, cache.tail_v):
        component[id(t)] = "dense sinks + window"
    for seg in cache.segments:
        for side in (seg.k, seg.v):
            component.update({id(t): "kept values" for t in side.values})
            component.update({id(t): "bitmaps" for t in side.bitmaps or []})
            component.update({id(side.channel_mask): "channel masks", id(side.rotation): "rotations"})
        component[id(seg.summary)] = "block summaries"
    parts: dict[str, int] = {}
    for t in cache.tensors():
        name = component.get(id(t), "method state")
        parts[name] = parts.get(name, 0) + t.numel() * t.element_size()
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4051)
    ap.add_argument("--heads", type=int, default=3, help="KV heads")
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--budget-ratio", type=float, default=3.0)
    ap.add_argument("--method", action="append", help="method[:key=value...], repeatable")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, object]] = {}
    for spec in a.method or ["mosaic:segment_len=4096"]:
        name, *pairs = spec.split(":")
        options = dict(p.split("=", 1) for p in pairs)
        backend = MosaicKVBackend({"method": name, **options})
        for dtype in (torch.float32, torch.bfloat16):
            k = torch.randn(a.tokens, a.heads, a.dim, generator=gen).to(dtype)
            v = torch.randn(a.tokens, a.heads, a.dim, generator=gen).to(dtype)
            q = torch.randn(32, a.q_heads, a.dim, generator=gen).to(dtype)
            ratio = fit_keep_ratio(name, backend.params, k, v, q, a.budget_ratio)
            cache = make_method(name, **{**backend.params, "keep_ratio": ratio}).encode(k, v, q)
            dense = 2 * k.numel() * k.element_size()
            parts = breakdown(cache)
            out[f"{spec} {str(dtype).removeprefix('torch.')}"] = {
                "keep_ratio": ratio,
                "dense_bytes": dense,
                "bytes": cache.nbytes,
                "x_less": dense / cache.nbytes,
                "fraction_of_dense": {p: b / dense for p, b in sorted(parts.items())},
            }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "shape": vars(a), "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
