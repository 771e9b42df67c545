"""End-to-end decode benchmark: a Llama-3.1-8B-shaped model (random bf16 weights; speed does not
depend on them) with a synthesised cache, stock attention vs MosaicKV, batch 1..8 (issue 7).

Per (context, batch): time between tokens (one full decode step: embeddings, 32 x [RMSNorm, QKV,
attention, O, RMSNorm, SwiGLU MLP], final norm, LM head) and throughput (batch / step time), for
  stock    PyTorch SDPA (its own backend choice) over dense bf16 K/V [B, H_kv, T, D] per layer,
           GQA queries as [B, H_kv, G, D];
  mosaickv the MosaicKV decode kernel (mosaickv.ops) over packed layers (keep 32/128, compact-16
           summaries, block 8, 10% of blocks, 4 sinks + 64-token window, 64K-token segments).
Caches are synthesised at their real size per layer (mosaickv.ops.DecodeLayout.synthetic builds them).
When 32 distinct layers do not fit in GPU memory, the step cycles over as many distinct layers as
fit (always several times the L2 cache), and the row says ``fits: false``: the time is what a
GPU with enough memory would take, the capacity columns say what fits on this one.

Also measured: the cache manager's own work per decode step (mosaickv.cache.CacheManager.append
for every layer and sequence: dense window, temporary segment, host copy, CPU job) against the
step time; whether its CPU threads keep up at the largest batch (backlog, stalls); CPU and GPU
utilisation while decoding; the longest context (batch 1) and the largest batch (per context)
whose caches fit next to the weights, from the measured bytes per token of each cache.

    python bench/decode/bench_decode.py --out bench/results/decode-h200.json   # on the H200
    python bench/decode/bench_decode.py --contexts 1048576 --manager-steps 0 --out ...  # one context
    python bench/decode/bench_decode.py --smoke --out /tmp/decode-smoke.json    # CPU, tiny shapes

``--smoke`` runs everything on the CPU at tiny shapes with the torch reference (MosaicKV through
the cache manager's own attention path); its timings say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "kernels"))  # timing.py
sys.path.insert(
    0, str(ROOT / "python")
)  # the GPU host runs from the working tree, uninstalled

from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.core import make_method
from mosaickv.ops import cuda_available
from timing import graph_time_ms, wall_times_ms

LLAMA_8B = {
    "layers": 32,
    "hidden": 4096,
    "heads": 32,
    "kv_heads": 8,
    "dim": 128,
    "inter": 14336,
    "vocab": 128256,
}
SMOKE = {
    "layers": 2,
    "hidden": 256,
    "heads": 4,
    "kv_heads": 2,
    "dim": 64,
    "inter": 512,
    "vocab": 512,
}
METHOD = {
    "keep_ratio": 0.25,
    "token_ratio": 0.10,
    "block_size": 8,
    "n_sink": 4,
    "window": 64,
    "summary": "compact",
    "summary_channels": 16,
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    dim: int
    inter: int
    vocab: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class Model:
    """Random-weight decoder with Llama's per-token work; attention is passed in per layer.

    ``step(tokens, attend)``: tokens [B] int64 -> logits [B, vocab]; attend(layer, q [B, H_q, D])
    -> [B, H_q, D]. RoPE and the K/V write are left out: both cost the same for every backend.
    """

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        self.s, self.device, self.dtype = shape, device, dtype

        def w(*size: int) -> torch.Tensor:
            return torch.randn(*size, device=device, dtype=dtype) * size[-1] ** -0.5

        s = shape
        self.embed = w(s.vocab, s.hidden)
        self.layers = [
            {
                "qkv": w((s.heads + 2 * s.kv_heads) * s.dim, s.hidden),
                "o": w(s.hidden, s.heads * s.dim),
                "gate_up": w(2 * s.inter, s.hidden),
                "down": w(s.hidden, s.inter),
                "n1": torch.ones(s.hidden, device=device, dtype=dtype),
                "n2": torch.ones(s.hidden, device=device, dtype=dtype),
            }
            for _ in range(s.layers)
        ]
        self.norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.head = w(s.vocab, s.hidden)

    @property
    def nbytes(self) -> int:
        ts = [self.embed, self.norm, self.head] + [
            t for layer in self.layers for t in layer.values()
        ]
        return sum(t.numel() * t.element_size() for t in ts)

    def step(
        self, tokens: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        s = self.s
        x = self.embed[tokens]
        for i, p in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), p["n1"])
            q = (h @ p["qkv"][: s.heads * s.dim].T).view(-1, s.heads, s.dim)
            x = x + attend(i, q).reshape(x.shape[0], -1) @ p["o"].T
            gate, up = (F.rms_norm(x, (s.hidden,), p["n2"]) @ p["gate_up"].T).chunk(
                2, dim=-1
            )
            x = x + (F.silu(gate) * up) @ p["down"].T
        return F.rms_norm(x, (s.hidden,), self.norm) @ self.head.T


class Utilisation:
    """Samples machine CPU busy fraction (/proc/stat), this process's CPU seconds and, on CUDA, the
    GPU's utilisation (NVML through torch, when available) while a block runs."""

    def __init__(self, cuda: bool, period_s: float = 0.05) -> None:
        self.cuda, self.period_s = cuda, period_s
        self.gpu: list[float] = []
        self._stop = threading.Event()

    @staticmethod
    def _cpu_ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals) - idle, sum(vals)

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.gpu.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no NVML binding there: report None, keep timing
                return

    def __enter__(self) -> Self:
        self._busy0, self._total0 = self._cpu_ticks()
        self._proc0, self._wall0 = time.process_time(), time.perf_counter()
        self._thread = (
            threading.Thread(target=self._sample, daemon=True) if self.cuda else None
        )
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        busy, total = self._cpu_ticks()
        wall = time.perf_counter() - self._wall0
        self.result = {
            "cpu_machine_busy": (busy - self._busy0) / max(1, total - self._total0),
            "cpu_process_cores": (time.process_time() - self._proc0) / max(wall, 1e-9),
            "cpu_cores": os.cpu_count(),
            "gpu_util_pct": statistics.mean(self.gpu) if self.gpu else None,
        }


def time_ms(fn: Callable[[], object], cuda: bool, repeats: int) -> float:
    """Median ms of fn: CUDA-graph replay on the GPU (bench/kernels/timing.py), wall clock on CPU."""
    if cuda:
        return graph_time_ms(fn, repeats)
    fn()
    return statistics.median(wall_times_ms(fn, repeats, cuda=False))


def distinct_layers(per_layer: int, free: int, shape: Shape) -> tuple[int, bool]:
    """Distinct cache layers to allocate (all of them when they fit in ``free`` bytes, else as
    many as fit, at least one) and whether all of them fit."""
    if per_layer * shape.layers <= free:
        return shape.layers, True
    return max(1, min(shape.layers, int(free // max(per_layer, 1)))), False


def stock_backend(
    shape: Shape,
    batch: int,
    t: int,
    device: torch.device,
    dtype: torch.dtype,
    free: int,
) -> tuple[Callable[[int, torch.Tensor], torch.Tensor], dict]:
    per_layer = (
        2
        * batch
        * shape.kv_heads
        * t
        * shape.dim
        * torch.empty(0, dtype=dtype).element_size()
    )
    n, fits = distinct_layers(per_layer, free, shape)
    kvs = [
        (
            torch.randn(
                batch, shape.kv_heads, t, shape.dim, device=device, dtype=dtype
            ),
            torch.randn(
                batch, shape.kv_heads, t, shape.dim, device=device, dtype=dtype
            ),
        )
        for _ in range(n)
    ]

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
        k, v = kvs[layer % n]
        qg = q.view(q.shape[0], shape.kv_heads, shape.group, shape.dim)
        return F.scaled_dot_product_attention(qg, k, v).view_as(q)

    return attend, {
        "bytes_per_token_layer": per_layer / (batch * t),
        "layers_distinct": n,
        "fits": fits,
    }


def mosaic_backend_cuda(
    shape: Shape, batch: int, t: int, free: int
) -> tuple[Callable[[int, torch.Tensor], torch.Tensor], dict]:
    """The decode kernel over synthesised packed layers (DecodeLayout.synthetic, compact-16 summaries,
    64K-token segments as in bench/kernels)."""
    from mosaickv.ops import DecodeLayout, DecodeWorkspace, run_decode

    def layer() -> DecodeLayout:
        return DecodeLayout.synthetic(
            batch,
            shape.kv_heads,
            shape.dim,
            t,
            keep=int(METHOD["keep_ratio"] * shape.dim),
            block=METHOD["block_size"],
            token_ratio=METHOD["token_ratio"],
            n_sink=METHOD["n_sink"],
            window=METHOD["window"],
            segment_len=65536,
            summary_kind=0,
            summary_width=METHOD["summary_channels"],
            dtype=torch.bfloat16,
            device="cuda",
        )

    probe = layer()
    per_layer = probe.nbytes()
    n, fits = distinct_layers(per_layer, free, shape)
    lays = [probe] + [layer() for _ in range(n - 1)]
    wss = [DecodeWorkspace.plan(lay, shape.group) for lay in lays]
    outs = [
        torch.empty(batch, shape.heads, shape.dim, device="cuda", dtype=torch.bfloat16)
        for _ in lays
    ]

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
        i = layer % n
        return run_decode(lays[i], wss[i], q.contiguous(), outs[i], shape.dim**-0.5)

    return attend, {
        "bytes_per_token_layer": per_layer / (batch * t),
        "layers_distinct": n,
        "fits": fits,
    }


def mosaic_backend_manager(
    shape: Shape,
    batch: int,
    t: int,
    device: torch.device,
    dtype: torch.dtype,
    segment_len: int,
) -> tuple[Callable[[int, torch.Tensor], torch.Tensor], dict, CacheManager]:
    """MosaicKV through the cache manager (prefill-encoded random K/V, every layer distinct)."""
    mgr = CacheManager(
        make_method("mosaic", segment_len=segment_len, **METHOD),
        shape.layers,
        shape.kv_heads,
        shape.dim,
        dtype,
        device,
        CacheConfig(page_bytes=4096),
    )
    rids = [f"seq{b}" for b in range(batch)]
    for rid in rids:
        mgr.add_request(rid)
        for layer in range(shape.layers):
            k = torch.randn(t, shape.kv_heads, shape.dim, device=device, dtype=dtype)
            mgr.prefill(rid, layer, k, torch.randn_like(k))
    kv_bytes = sum(mgr.request_stats(r)["kv_bytes"] for r in rids)

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
        return mgr.attend(rids, layer, q)

    return (
        attend,
        {
            "bytes_per_token_layer": kv_bytes / (batch * t * shape.layers),
            "layers_distinct": shape.layers,
            "fits": True,
        },
        mgr,
    )


def manager_overhead(
    shape: Shape,
    batch: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    prompt: int,
    segment_len: int,
    threads: int | None,
    evict_tokens: int,
    append_kernel: bool = True,
) -> dict:
    """Wall ms per decode step of CacheManager.append over every layer and sequence, and whether
    the CPU re-encoders (``threads``; None: the manager's default) keep up (backlog, stalls) over
    ``steps`` steps; tokens leave the window ``evict_tokens`` at a time (CacheConfig)."""
    mgr = CacheManager(
        make_method(
            "mosaic",
            segment_len=segment_len,
            min_segment_len=min(128, segment_len),
            **METHOD,
        ),
        shape.layers,
        shape.kv_heads,
        shape.dim,
        dtype,
        device,
        CacheConfig(n_threads=threads, evict_tokens=evict_tokens, append_kernel=append_kernel),
    )
    try:
        rids = [f"seq{b}" for b in range(batch)]
        for rid in rids:
            mgr.add_request(rid)
            for layer in range(shape.layers):
                k = torch.randn(
                    prompt, shape.kv_heads, shape.dim, device=device, dtype=dtype
                )
                mgr.prefill(rid, layer, k, torch.randn_like(k))
        new = torch.randn(
            steps, batch, shape.kv_heads, shape.dim, device=device, dtype=dtype
        )
        cuda = device.type == "cuda"
        step_tokens = iter(new)

        def append_step() -> None:
            # [batch, H_kv, D]: this step's token of every sequence
            tok = next(step_tokens)
            for layer in range(shape.layers):
                for b, rid in enumerate(rids):
                    mgr.append(rid, layer, tok[b : b + 1], tok[b : b + 1])

        with Utilisation(cuda) as util:
            times = wall_times_ms(append_step, steps, cuda)
            behind = mgr.stats()
            drain_t0 = time.perf_counter()
            mgr.drain()
            drain_s = time.perf_counter() - drain_t0
        stats = mgr.stats()
        return {
            "batch": batch,
            "steps": steps,
            # the mean, not the median: with evict_tokens > 1 most steps evict nothing and one in
            # evict_tokens carries the encode (append_ms_max shows that step)
            "append_ms_per_step": statistics.fmean(times),
            "append_ms_median": statistics.median(times),
            "append_ms_max": max(times),
            "backlog_tokens_at_end": behind["cache_backlog_tokens"],
            "backlog_peak": stats["cache_backlog_peak"],
            "backlog_limit": stats["cache_backlog_limit"],
            "stalls": stats["cache_backlog_stalls"],
            "stall_s": stats["cache_backlog_stall_s"],
            "reencodes": stats["cache_reencodes"],
            "reencode_s": stats["cache_reencode_s"],
            "drain_after_s": drain_s,
            "threads": stats["cache_threads"],
            "utilisation": util.result,
        }
    finally:
        mgr.close()


def measure(
    backend: str,
    model: Model,
    t: int,
    batch: int,
    free: int,
    segment_len: int,
    repeats: int,
) -> dict:
    """One (backend, context, batch) row: time between tokens, throughput, bytes, utilisation; a
    backend whose caches cannot be allocated gives a row with ``ms: None`` and the error."""
    shape, device, dtype = model.s, model.device, model.dtype
    cuda = device.type == "cuda"
    tok = torch.randint(0, shape.vocab, (batch,), device=device)
    row: dict = {"context": t, "batch": batch, "backend": backend}
    mgr = None
    try:
        if backend == "stock":
            attend, info = stock_backend(shape, batch, t, device, dtype, free)
        elif cuda:
            attend, info = mosaic_backend_cuda(shape, batch, t, free)
        else:
            attend, info, mgr = mosaic_backend_manager(
                shape, batch, t, device, dtype, segment_len
            )
        with Utilisation(cuda) as util:
            ms = time_ms(lambda: model.step(tok, attend), cuda, repeats)
        row.update(
            ms=ms, tokens_per_s=batch / (ms * 1e-3), **info, utilisation=util.result
        )
    except torch.cuda.OutOfMemoryError as err:
        row.update(
            ms=None,
            fits=False,
            error=f"out of memory: {str(err).splitlines()[0][:200]}",
        )
    finally:
        if mgr is not None:
            mgr.close()
        attend = None  # drop this row's caches before the next row allocates its own
        if cuda:
            torch.cuda.empty_cache()
    return row


def capacity(
    shape: Shape, free: int, per_token: dict[str, float], contexts: list[int]
) -> dict:
    """Longest context at batch 1 and largest batch per context whose caches fit in ``free`` bytes."""
    out: dict = {}
    for name, b in per_token.items():
        all_layers = b * shape.layers
        out[name] = {
            "bytes_per_token_all_layers": all_layers,
            "max_context_batch1": int(free // all_layers),
            "max_batch": {str(t): int(free // (all_layers * t)) for t in contexts},
        }
    if "stock" in out and "mosaickv" in out:
        out["context_ratio"] = out["mosaickv"]["max_context_batch1"] / max(
            1, out["stock"]["max_context_batch1"]
        )
    return out


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend in ("stock", "mosaickv"):
        for t in sorted({r["context"] for r in doc["decode"]}):
            pts = [
                (r["batch"], r["ms"], r["tokens_per_s"])
                for r in doc["decode"]
                if r["backend"] == backend and r["context"] == t
            ]
            axes[0].plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=f"{backend} {t // 1024}K",
            )
            axes[1].plot(
                [p[0] for p in pts],
                [p[2] for p in pts],
                marker="o",
                label=f"{backend} {t // 1024}K",
            )
    axes[0].set(xlabel="batch", ylabel="ms between tokens", yscale="log")
    axes[1].set(xlabel="batch", ylabel="tokens / s", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="JSON output; a .png plot goes beside it",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU (checks the script)",
    )
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--manager-steps",
        type=int,
        default=200,
        help="decode steps of the manager-overhead probe (0 skips it)",
    )
    parser.add_argument(
        "--manager-segment-len",
        type=int,
        default=128,
        help="decode segment length in that probe: short, so that closes and re-encodes "
        "happen within the measured steps",
    )
    parser.add_argument(
        "--manager-evict-tokens",
        type=int,
        nargs="+",
        default=[1],
        help="CacheConfig.evict_tokens values to probe (tokens leaving the window at a time)",
    )
    parser.add_argument(
        "--manager-append",
        nargs="+",
        choices=["kernel", "torch"],
        default=["kernel"],
        help="how the probe's manager encodes evicted tokens on the GPU (CacheConfig.append_kernel)",
    )
    parser.add_argument(
        "--manager-threads",
        type=int,
        help="CPU re-encoder threads in that probe (default: the manager's, cores - 1)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda = not args.smoke
    if args.smoke:
        torch.set_num_threads(
            1
        )  # tiny tensors: intra-op threads only add contention on a small CPU
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    if cuda and not cuda_available():
        parser.error(
            "the MosaicKV kernels are not built: run `python -m mosaickv.ops.compile` first"
        )
    device, dtype = (
        torch.device("cuda" if cuda else "cpu"),
        torch.bfloat16 if cuda else torch.float32,
    )
    shape = Shape(**(SMOKE if args.smoke else LLAMA_8B))
    contexts = args.contexts or (
        [256, 512] if args.smoke else [131072, 524288, 1048576]
    )
    batches = args.batches or ([1, 2] if args.smoke else [1, 2, 4, 8])
    segment_len = 128 if args.smoke else 65536
    model = Model(shape, device, dtype)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        free = int(
            total - model.nbytes - (6 << 30)
        )  # activations, workspaces, allocator slack
    else:
        free = 1 << 40
    rows, per_token = [], {}
    for t in contexts:
        for batch in batches:
            for backend in ("stock", "mosaickv"):
                row = measure(backend, model, t, batch, free, segment_len, args.repeats)
                rows.append(row)
                if row["ms"] is not None:
                    per_token.setdefault(backend, row["bytes_per_token_layer"])
                    print(
                        f"T={t:>8} B={batch} {backend:<8} {row['ms']:9.3f} ms/token "
                        f"{row['tokens_per_s']:9.1f} tok/s  fits={row['fits']}",
                        flush=True,
                    )
                else:
                    print(f"T={t:>8} B={batch} {backend:<8} {row['error']}", flush=True)
    for r in rows:
        base = next(
            s
            for s in rows
            if s["backend"] == "stock"
            and (s["context"], s["batch"]) == (r["context"], r["batch"])
        )
        if (
            r["backend"] == "mosaickv"
            and r["ms"] is not None
            and base["ms"] is not None
        ):
            r["speedup_time_between_tokens"] = base["ms"] / r["ms"]
            r["speedup_throughput"] = r["tokens_per_s"] / base["tokens_per_s"]
    doc = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "shape": shape.__dict__,
        "method": {**METHOD, "segment_len": segment_len},
        "dtype": str(dtype),
        "model_bytes": model.nbytes,
        "free_for_cache_bytes": free,
        "decode": rows,
        "capacity": capacity(shape, free, per_token, contexts),
        "manager_overhead": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))  # the decode rows survive a probe cut short
    step_128k = {
        r["batch"]: r["ms"]
        for r in rows
        if r["backend"] == "mosaickv" and r["context"] == min(contexts)
    }
    probes = [
        (b, e, a)
        for b in sorted({1, max(batches)})
        for e in args.manager_evict_tokens
        for a in args.manager_append
    ]
    for b, evict, append in probes if args.manager_steps > 0 else []:
        o = manager_overhead(
            shape,
            b,
            args.manager_steps,
            device,
            dtype,
            256,  # prompt: only the window and the temporary segment matter to this probe
            args.manager_segment_len,
            args.manager_threads,
            evict,
            append == "kernel",
        )
        o["evict_tokens"], o["append"] = evict, append
        if b in step_128k:
            o["fraction_of_mosaickv_step"] = o["append_ms_per_step"] / step_128k[b]
        print(
            f"manager B={b} evict_tokens={evict} append={append}: {o['append_ms_per_step']:.3f} ms/step mean, "
            f"{o['append_ms_max']:.3f} max "
            f"({100 * o.get('fraction_of_mosaickv_step', float('nan')):.1f}% of the {min(contexts) // 1024}K step), "
            f"backlog peak {o['backlog_peak']}/{o['backlog_limit']}, stalls {o['stalls']}, "
            f"re-encodes {o['reencodes']}",
            flush=True,
        )
        doc["manager_overhead"].append(o)
        args.out.write_text(json.dumps(doc, indent=1))
    plot(doc, args.out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
