"""Prompt prefill through the cache manager, one layer, stage by stage: where a long prompt's
time to first token goes besides the model itself.

One layer of Llama-3.1-8B shape (8 KV heads, d = 128, bf16, random K/V) with the method of
bench_decode.py, one ``--tokens``-token segment (64K: the step benchmark's segments):
  encode     the core method's encode of the segment (rotations, strategy, packed rows, summaries)
  page       ``PagedSegment.from_core``: its rows, rotations and summary written into pool pages
  gather     ``PagedSegment.to_core``: the same bytes read back out of the pages (the core
             reference's attention path, and a temporary segment's strategy)
  copy       baseline, same run: the same bytes (values, bitmaps, rotations, summary) copied once
             as whole tensors, the floor for page and gather
  prefill    ``CacheManager.prefill`` of the layer: encode + page + the dense sinks and window
  share      ``PagedSegment.shared`` and the release of that copy: what a fork adds and what
             freeing a request takes, per segment (host work only: page reference counts)
  evict_pages  the pages an eviction (the vLLM backend's 256 tokens) takes for a temporary
             segment's stripes (one per head, K and V, shaped as the segment's): the pool's share of
             an eviction on the decode path (``PagedStripe.grow`` alone, on the host)
Wall time of each call (synchronised on CUDA), median over ``--repeats``; JSON to ``--out``.

    python3 bench/decode/bench_paging.py --out bench/results/paging-h200.json        # GPU
    python3 bench/decode/bench_paging.py --device cpu --tokens 16384 --out /tmp/paging.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA_8B, METHOD
from mosaickv.cache import (
    CacheConfig,
    CacheManager,
    PagedSegment,
    PagedStripe,
    PagePool,
)
from mosaickv.core import Segment, make_method
from mosaickv.engines.vllm.config import MosaicSettings
from timing import wall_times_ms  # bench/kernels, on the path from bench_decode

EVICT_TOKENS = MosaicSettings().evict_tokens  # the vLLM backend's


def segment_tensors(seg: Segment) -> list[torch.Tensor]:
    """Every tensor a core segment holds per token: packed values and bitmaps, rotations, summary."""
    parts = [seg.summary] if seg.summary is not None else []
    for side in (seg.k, seg.v):
        parts += [*side.values, *(side.bitmaps or [])]
        parts += [side.rotation] if side.rotation is not None else []
    return parts


def run(tokens: int, page_bytes: int, repeats: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    dtype, heads, dim = torch.bfloat16, LLAMA_8B["kv_heads"], LLAMA_8B["dim"]
    method = make_method("mosaic", **(METHOD | {"segment_len": tokens}))
    k = torch.randn(
        tokens + METHOD["n_sink"] + METHOD["window"],
        heads,
        dim,
        dtype=dtype,
        device=device,
    )
    v = torch.randn_like(k)
    body = slice(METHOD["n_sink"], METHOD["n_sink"] + tokens)
    seg = method.encode(k, v).segments[0]
    assert seg.length == tokens, (
        f"one {tokens}-token segment expected, got {seg.length}"
    )
    pool = PagePool(page_bytes, device)
    parts = segment_tensors(seg)
    nbytes = sum(t.numel() * t.element_size() for t in parts)

    def page() -> PagedSegment:
        return PagedSegment.from_core(seg, body.start, pool, dtype, method.block_size)

    def page_and_release() -> None:
        for part in page().paged():
            part.release()

    paged = page()
    mgr = CacheManager(
        method,
        1,
        heads,
        dim,
        dtype,
        device,
        CacheConfig(page_bytes=pool.page_bytes, n_threads=1),
    )
    rid = itertools.count()

    def prefill() -> None:
        name = f"r{next(rid)}"
        mgr.add_request(name)
        mgr.prefill(name, 0, k, v)
        mgr.free(name)

    def share_and_release() -> None:
        for part in paged.shared().paged():
            part.release()

    def evict_pages_ms() -> float:
        """One eviction's page allocation, timed alone: stripes made before, released after."""
        stripes = [
            PagedStripe(pool, dim, s.group, s.keep, dtype, method.block_size)
            for s in paged.k + paged.v
        ]
        began = time.perf_counter()
        for s in stripes:
            s.grow(EVICT_TOKENS)
        took = (time.perf_counter() - began) * 1e3
        for s in stripes:
            s.release()
        return took

    stages = {
        "encode": lambda: method.encode(k, v),
        "page": page_and_release,
        "gather": paged.to_core,
        "copy": lambda: [t.clone() for t in parts],
        "prefill": prefill,
        "share": share_and_release,
    }
    try:
        ms = {}
        for name, fn in stages.items():
            fn()  # warm-up: allocator, kernels' first launch
            ms[name] = statistics.median(wall_times_ms(fn, repeats, cuda))
            print(f"{name:8s} {ms[name]:10.2f} ms", flush=True)
        evict_pages_ms()  # warm-up
        ms["evict_pages"] = statistics.median(evict_pages_ms() for _ in range(repeats))
        print(f"evict_pages {ms['evict_pages']:7.3f} ms", flush=True)
    finally:
        mgr.close()
    return {
        "tokens": tokens, "page_bytes": pool.page_bytes, "segment_bytes": nbytes,
        "pages": sum(len(p.pages) for p in paged.paged()), "ms": ms,
        "page_over_copy": ms["page"] / ms["copy"], "gather_over_copy": ms["gather"] / ms["copy"],
        "page_share_of_prefill": ms["page"] / ms["prefill"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument(
        "--page-bytes", type=int, default=4096, help="as bench_manager_step.py"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    with torch.inference_mode():
        row = run(args.tokens, args.page_bytes, args.repeats, device)
    doc = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "method": METHOD | {"segment_len": args.tokens}, "row": row}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
