"""Decode attention through the cache manager on the H200: what the manager adds to the kernels.

A manager holds ``--layers`` distinct layers of Llama-3.1-8B attention shapes (8 KV heads, d = 128,
bf16; random K/V prefilled at ``--context`` tokens per sequence; keep 32/128, compact-16 summaries,
block 8, 10% of blocks, 64K-token segments, 4 KiB pages). Per batch, ``--repeats`` decode steps (each
layer appends one token per sequence, evict_tokens 8, then attends), each call CUDA-synchronised:
  manager   ``CacheManager.attend`` (median and mean): acquire the snapshots, reuse the layer's
            tables or rebuild them when a window evicted into a temporary segment (closed segments'
            tables are cached), copy the dense sinks and window, launch the kernels, which read
            the pages in place;
  tables    ``snapshot_layout`` alone (host work + small copies);
  kernels   ``run_decode`` alone on that same layout and workspace (what the manager wraps).
The manager's own attention overhead per decode step is (manager mean - kernels) x 32 layers (the
append's cost is measured by bench_decode.py's manager probe).

    python3 bench/decode/bench_manager_attend.py --out bench/results/manager-attend-h200.json
    python3 bench/decode/bench_manager_attend.py --smoke --out /tmp/manager-attend.json  # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # timing.py
from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.cache.tables import snapshot_layout
from mosaickv.core import make_method
from mosaickv.ops import cuda_available, run_decode
from timing import wall_times_ms

H_Q, H_KV, D, N_LAYERS = 32, 8, 128, 32
METHOD = {"keep_ratio": 0.25, "token_ratio": 0.10, "block_size": 8, "n_sink": 4, "window": 64,
          "summary": "compact", "summary_channels": 16, "segment_len": 65536}  # fmt: skip


def median_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    return statistics.median(wall_times_ms(fn, repeats, cuda))


def run(context: int, batch: int, layers: int, repeats: int, device: torch.device, method: dict) -> dict:
    cuda = device.type == "cuda"
    mgr = CacheManager(make_method("mosaic", **method), layers, H_KV, D, torch.bfloat16, device,
                       CacheConfig(page_bytes=4096, evict_tokens=8))  # fmt: skip
    rids = [f"seq{b}" for b in range(batch)]
    began = time.perf_counter()
    for rid in rids:
        mgr.add_request(rid)
        for layer in range(layers):
            k = torch.randn(context, H_KV, D, device=device, dtype=torch.bfloat16)
            mgr.prefill(rid, layer, k, torch.randn_like(k))
    prefill_s = time.perf_counter() - began
    q = torch.randn(batch, H_Q, D, device=device, dtype=torch.bfloat16)
    new_k = torch.randn(1, H_KV, D, device=device, dtype=torch.bfloat16)
    for layer in range(layers):  # warm-up: the process's first launches load kernels and allocator pools
        mgr.attend(rids, layer, q)
    times = []
    for step in range(repeats):  # decode steps: each layer appends a token per sequence, then attends
        for layer in range(layers):
            for rid in rids:
                mgr.append(rid, layer, new_k, new_k)
            times.append(median_ms(lambda layer=layer: mgr.attend(rids, layer, q), 1, cuda))
    manager, manager_mean = statistics.median(times), statistics.fmean(times)
    streams = [mgr._stream(r, 0) for r in rids]
    snaps = [s.snapshot for s in streams]
    methods = [s.method for s in streams]
    tables = median_ms(lambda: snapshot_layout(snaps, methods, mgr.pool, H_Q // H_KV), repeats, cuda)
    row = {"context": context, "batch": batch, "layers": layers, "prefill_s": prefill_s,
           "manager_ms": manager, "manager_mean_ms": manager_mean, "tables_ms": tables}  # fmt: skip
    if cuda:
        lay, ws = snapshot_layout(snaps, methods, mgr.pool, H_Q // H_KV)
        out = torch.empty_like(q)
        row["kernels_ms"] = median_ms(lambda: run_decode(lay, ws, q, out, D**-0.5), repeats, cuda)
        row["overhead_ms_per_step"] = (manager_mean - row["kernels_ms"]) * N_LAYERS
        row["page_bytes_used"] = mgr.stats()["cache_page_bytes"]
    mgr.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=2, help="distinct layers held (calls cycle over them)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.smoke and not cuda_available():
        parser.error("needs a CUDA GPU and the built kernels (python -m mosaickv.ops.compile); or --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    method = METHOD | ({"segment_len": 256} if args.smoke else {})
    contexts = [1200] if args.smoke else args.contexts
    rows = []
    for t in contexts:
        for b in args.batches:
            row = run(t, b, args.layers, args.repeats, device, method)
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
           "method": method, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
