"""The decode thread's own host time per layer call, on any CPU: what ``CacheManager.append_batch``
and ``attend`` cost in Python on the CUDA path, between their kernel launches.

The manager is built on the CPU and switched to its CUDA code path, with the launches replaced by
no-ops (``append_dense_rows`` and ``run_decode``: their device time is the GPU's, timed with
everything else by bench_manager_step.py on the H200). Steps where no token leaves the window only
(the evictions take the torch path on a CPU, which is not what a GPU runs): the steady state of
a decode step, ``batch`` sequences forked from one prompt, one layer. Timings on a shared machine
vary by 2x from run to run: each batch size is timed on ``--repeats`` fresh managers and the
least disturbed median is reported (``us_per_layer``), with every median. Also timed: what an
eviction step adds on the host for the layer, the rebuild of its kernel tables for the batch
(``snapshot_layout``; ``rebuild_us``, the same way).

    python3 bench/decode/bench_host_path.py --out bench/results/host-path-cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import statistics
import sys
import time
import types
from pathlib import Path

import mosaickv.cache.dense_batch as dense_batch_module
import mosaickv.cache.manager as manager_module
import torch
from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.cache.tables import snapshot_layout
from mosaickv.core import make_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # timing.py
from timing import host_cpu

H_KV, H_Q, D = 8, 32, 128  # Llama-3.1-8B attention shapes
METHOD = {"keep_ratio": 0.25, "segment_len": 1024, "window": 64, "n_sink": 4, "summary": "compact",
              "summary_channels": 16, "token_ratio": 0.1}  # fmt: skip
EVICT_TOKENS = 256  # the vLLM backend's: no eviction within the warm-up and timed steps


def host_path() -> None:
    """Replace the two launches of the steady-state path by no-ops (on the CPU, append_dense_rows
    would run its Python reference)."""
    dense_batch_module.append_dense_rows = lambda *args: None  # type: ignore[assignment]
    manager_module.run_decode = lambda layout, ws, q, out, scale: out  # type: ignore[assignment]


def run(
    batch: int, prompt: int, steps: int, profile: bool
) -> tuple[float, float, str | None]:
    """A fresh manager holding ``batch`` sequences: the median microseconds of ``steps`` layer calls
    (``append_batch`` + ``attend``) and of 20 table rebuilds, and cProfile's top functions over 50
    more layer calls if ``profile``."""
    method = make_method("mosaic", **METHOD)
    config = CacheConfig(page_bytes=4096, evict_tokens=EVICT_TOKENS, n_threads=1)
    mgr = CacheManager(method, 1, H_KV, D, torch.bfloat16, "cpu", config)
    rids = [f"seq{b}" for b in range(batch)]
    try:
        mgr.add_request(rids[0])
        k = torch.randn(prompt, H_KV, D).bfloat16()
        mgr.prefill(rids[0], 0, k, k)
        for rid in rids[1:]:
            mgr.fork(rids[0], rid)
        mgr._plan_device = types.SimpleNamespace(type="cuda")  # attention's CUDA path
        new = torch.randn(batch, H_KV, D).bfloat16()
        q = torch.randn(batch, H_Q, D).bfloat16()

        def step() -> None:
            mgr.append_batch(rids, 0, new, new)
            mgr.attend(rids, 0, q)

        for _ in range(16):
            step()
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e6)
        top = None
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                step()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
            top = text.getvalue()
        if mgr.stats()["cache_backlog_peak"]:
            raise RuntimeError("a token left the window: lower --steps")
        snaps = [mgr._stream(r, 0).snapshot for r in rids]
        rebuilds = []
        for _ in range(20):
            began = time.perf_counter()
            snapshot_layout(snaps, [method] * batch, mgr.pool, H_Q // H_KV)
            rebuilds.append((time.perf_counter() - began) * 1e6)
        return statistics.median(times), statistics.median(rebuilds), top
    finally:
        mgr.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--prompt", type=int, default=4096, help="prompt tokens (segments of 1024)"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="fresh managers per batch size; the least disturbed median is reported",
    )
    parser.add_argument(
        "--profile", action="store_true", help="add cProfile's top functions"
    )
    args = parser.parse_args()
    if 16 + args.steps + 50 * args.profile >= EVICT_TOKENS:
        parser.error(f"--steps must be below {EVICT_TOKENS - 66}: no step may evict")
    host_path()
    rows = []
    with torch.inference_mode():
        for b in args.batches:
            runs = [
                run(b, args.prompt, args.steps, args.profile and r == 0)
                for r in range(args.repeats)
            ]
            medians = [us for us, _, _ in runs]
            rebuilds = [us for _, us, _ in runs]
            row = {"batch": b, "prompt": args.prompt, "steps": args.steps,
                   "us_per_layer": min(medians), "us_per_layer_medians": medians,
                   "rebuild_us": min(rebuilds), "rebuild_us_medians": rebuilds}  # fmt: skip
            print(json.dumps(row), flush=True)
            if runs[0][2] is not None:
                print(runs[0][2], flush=True)
                row["profile"] = runs[0][2]
            rows.append(row)
    doc = {"date": datetime.date.today().isoformat(), "command": "python3 " + " ".join(sys.argv),
           **host_cpu(), "torch": torch.__version__, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
