"""Measurements behind mosaic's defaults (docs/FORMAT.md quotes them):

1. block summary kind (mean / minmax / compact first-m rotated channels) at the same total memory;
2. group size g in {1, 2, 4} at the same total memory;
3. strategy-search loss threshold: bytes and error per threshold;
4. encoding time of 32K tokens x 8 KV heads x 128 dims (bf16, CPU).

    .venv/bin/python bench/analysis/sweep_defaults.py [--no-model] [--out bench/results/analysis_sweep.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from inputs import load_captured, smollm2, synthetic, to_device
from metrics import evaluate, match_memory
from mosaickv.core import make_method

SUMMARIES = [("mean", 32), ("minmax", 32), ("compact", 8), ("compact", 16), ("compact", 32), ("compact_minmax", 8),
             ("compact_minmax", 16)]


def summary_bytes_per_token(cache: Any) -> float:
    return sum(s.summary.numel() * s.summary.element_size() for s in cache.segments) / cache.length


def sweep(x: dict[str, Any], ratio: float, common: dict[str, Any], default_summary: dict[str, Any]
          ) -> list[dict[str, Any]]:
    d = x["k"].shape[-1]
    target = int(make_method("full").encode(x["k"], x["v"]).nbytes / ratio)
    rows: list[dict[str, Any]] = []

    def record(study: str, setting: str, method: Any, cache: Any) -> None:
        rows.append({"input": x["name"], "study": study, "setting": setting, "keep_ratio": method.keep_ratio,
                     "summary_bytes_per_token": summary_bytes_per_token(cache) if method.selects_blocks else 0,
                     **evaluate(cache, x)})
        r = rows[-1]
        keep = "-" if r["keep_ratio"] is None else f"{r['keep_ratio']:.3f}"
        print(f"{study:<10} {setting:<16} keep {keep:>6}  err {r['rel_error']:.4f}  recall {r['recall']:.4f}  "
              f"bytes {r['bytes']}  summary B/token {r['summary_bytes_per_token']:.1f}", flush=True)

    for kind, m in SUMMARIES:
        params = {**common, "token_ratio": 0.10, "summary": kind, "summary_channels": m}
        record("summary", kind if kind in ("mean", "minmax") else f"{kind} m={m}",
               *match_memory("mosaic", params, x, target, list(range(1, d + 1))))
    for g in (1, 2, 4):
        params = {**common, "token_ratio": 0.10, "group": g, **default_summary}
        record("group", f"g={g}", *match_memory("mosaic", params, x, target, list(range(g, d + 1, g))))
    for threshold in (0.02, 0.05, 0.1, 0.2, 0.3):
        method = make_method("mosaic", **common, token_ratio=0.10, keep_ratio=None, loss_threshold=threshold,
                             **default_summary)
        record("threshold", f"loss<={threshold}", method, method.encode(x["k"], x["v"]))
    return rows


def encode_seconds(keep_ratio: float | None) -> float:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(32768, 8, 128, generator=gen).to(torch.bfloat16)
    v = torch.randn(32768, 8, 128, generator=gen).to(torch.bfloat16)
    method = make_method("mosaic", keep_ratio=keep_ratio)
    start = time.perf_counter()
    method.encode(k, v)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--ratio", type=float, default=3.0)
    parser.add_argument("--segment-len", type=int, default=4096)
    parser.add_argument("--summary", default="compact_minmax", help="summary used by the g and threshold studies")
    parser.add_argument("--summary-channels", type=int, default=16)
    parser.add_argument("--model-kv", help="use a capture saved by inputs.py --capture instead of the model")
    parser.add_argument("--device", default="cpu", help="torch device for the caches (cpu or cuda)")
    parser.add_argument("--out", default="bench/results/analysis_sweep.json")
    args = parser.parse_args()
    common = {"n_sink": 4, "window": 64, "block_size": 8, "segment_len": args.segment_len}
    default_summary = {"summary": args.summary, "summary_channels": args.summary_channels}
    inputs = [synthetic(t=4096)]
    if args.model_kv:
        inputs += load_captured(args.model_kv)
    elif not args.no_model:
        inputs += smollm2(n_tokens=3072)
    inputs = [to_device(x, args.device) for x in inputs]
    rows = []
    for x in inputs:
        print(f"\n== {x['name']} (memory target full / {args.ratio})")
        rows += sweep(x, args.ratio, common, default_summary)
    timing = {"tokens": 32768, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "segment_len": 1024,
              "fixed_keep_0.25_s": encode_seconds(0.25), "search_s": encode_seconds(None),
              "threads": torch.get_num_threads()}
    print(f"\nencode 32K x 8 x 128 bf16 on CPU: {timing}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {**common, "ratio": args.ratio, "device": args.device}, "rows": rows,
                               "encode": timing},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
