"""The cache manager's own overhead per decode step, end to end (issue 7's "< 5% at 128K").

A Llama-3.1-8B-shaped model (bench_decode.Model: 32 layers, random bf16 weights) decodes through
one ``CacheManager`` holding every layer of ``--batch`` sequences at ``--context`` tokens (random
K/V prefilled into layer caches of sequence 0, the others forked from it: closed segments shared
page for page, as n > 1 sampling would; each sequence then appends a different number of tokens
first, so that their windows evict on different steps, as in serving). Timed per step (CUDA-
synchronised once per step), in one run, in two modes: ``eager`` (every op launched from Python)
and ``piecewise`` (as vLLM decodes with piecewise CUDA graphs: all but attention replayed from
graphs, attention eager; CUDA only):
  manager  every layer: ``append_batch`` of one token per sequence (windows, evictions of
           ``--evict-tokens`` tokens into the temporary segment by the append kernel, host copies,
           CPU re-encoder jobs; ``--per-request-appends``: one ``append`` per sequence, as the
           results before append_batch ran), then ``attend``;
  kernels  the same model and kernels over the same caches, frozen after the warm-up: each layer's
           tables built once from the manager's snapshots (``snapshot_layout``), ``run_decode`` only.
The two alternate step by step (``"alternating": true`` in the JSON; runs before the eighth
session timed all manager steps, then all kernel steps): the host's speed, which sets a host-bound
step's pace, drifts within a run and differs between machines.
overhead = manager - kernels (means), per step and as a fraction of the kernels' step in the same
mode and of the whole step captured in one CUDA graph (``kernels_graph_ms``: no launch cost at all).
``*_host_ms_mean``: the host's time per step, until the step's last launch returned (below the
step's wall time: the GPU, not the host, set the pace). Python's garbage collections during the
manager's timed steps are counted and timed (``gc_*``);
each run first freezes the objects the process holds so far, as vLLM does after start-up (results
without ``"gc_frozen": true`` in their JSON ran without).
``--profile`` adds the decode thread's functions by cumulative time over a few manager steps
(cProfile, the CPU re-encoders paused meanwhile). Everything runs in ``torch.inference_mode``, as
vLLM's model runner decodes (results without an ``appends`` field in their JSON ran outside it).

Each step's slowest layer call and its layer are recorded (``slowest_layer_call_steps``): an
eviction's host time delays the step only in the first layers, before the host has run ahead of
the GPU, so a fair average covers a whole eviction cycle at steady state (``--warm-up`` and
``--steps`` of evict_tokens or more, below). ``reencode_ms_in_layers_0_7_steps`` (phases.reencode_jobs): per step, the
milliseconds of re-encoder jobs (after their copies landed) that ran while the decode thread was in
layers 0-7, where a host delay still reaches the GPU (summarize_step.py sets those steps apart).

    python3 -m mosaickv.ops.compile
    python3 bench/decode/bench_manager_step.py --batches 8 --steps 256 --warm-up 272 \
        --mode piecewise --out bench/results/manager-step-h200-b8-cycle.json
    python3 bench/decode/bench_manager_step.py --smoke --out /tmp/manager-step.json   # CPU check
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

# bench_decode (beside this file): the model, the method and the timing helper
sys.path.insert(0, str(Path(__file__).resolve().parent))
import phases
import queued_probe
from bench_decode import LLAMA_8B, METHOD, SMOKE, Model, Shape, time_ms
from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.cache.segments import Snapshot
from mosaickv.cache.tables import snapshot_layout
from mosaickv.core import make_method
from mosaickv.engines.vllm.config import MosaicSettings
from mosaickv.ops import DecodePlan, cuda_available, run_decode
from timing import (  # bench/kernels, on the path from bench_decode
    host_cpu,
    wall_times_ms,
)


class PiecewiseStep:
    """``Model.step`` as vLLM runs decode with piecewise CUDA graphs: everything between two
    attention calls (the O projection, MLP and norms of one layer, the norm and Q projection of the
    next) is one captured graph; attention runs eagerly in between, reading and writing static
    buffers."""

    def __init__(self, model: Model, tokens: torch.Tensor) -> None:
        s, p = model.s, model.layers
        self.n = s.layers
        self.tok = tokens.clone()
        self.x = torch.zeros(
            len(tokens), s.hidden, device=tokens.device, dtype=model.dtype
        )
        self.q = torch.zeros(
            len(tokens), s.heads, s.dim, device=tokens.device, dtype=model.dtype
        )
        self.attn = torch.zeros_like(self.q)
        self.logits: torch.Tensor | None = None

        def project_q(i: int) -> None:
            h = F.rms_norm(self.x, (s.hidden,), p[i]["n1"])
            self.q.copy_((h @ p[i]["qkv"][: s.heads * s.dim].T).view_as(self.q))

        def finish(i: int) -> None:  # layer i after its attention
            self.x.add_(self.attn.reshape(len(self.tok), -1) @ p[i]["o"].T)
            gate, up = (
                F.rms_norm(self.x, (s.hidden,), p[i]["n2"]) @ p[i]["gate_up"].T
            ).chunk(2, dim=-1)
            self.x.add_((F.silu(gate) * up) @ p[i]["down"].T)

        def piece(j: int) -> None:
            if j == 0:
                self.x.copy_(model.embed[self.tok])
            else:
                finish(j - 1)
            if j < self.n:
                project_q(j)
            else:
                self.logits = F.rms_norm(self.x, (s.hidden,), model.norm) @ model.head.T

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for j in range(self.n + 1):
                piece(j)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        for j in range(self.n + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece(j)
            self.graphs.append(graph)

    def step(self, attend: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.graphs[0].replay()
        for i in range(self.n):
            self.attn.copy_(attend(i, self.q))
            self.graphs[i + 1].replay()


@contextmanager
def gc_pauses() -> Iterator[list[tuple[int, float]]]:
    """Python's garbage collections while the block runs: (generation, milliseconds) of each
    (a full collection walks every object the manager holds: a step it lands in is that much longer)."""
    seen: list[tuple[int, float]] = []
    began = 0.0

    def note(phase: str, info: dict) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            seen.append((info["generation"], (time.perf_counter() - began) * 1e3))

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)


def run(shape: Shape, context: int, batch: int, steps: int, config: CacheConfig,
        paused: bool, profile: bool, per_request: bool, device: torch.device, method: dict,
        probe_steps: int = 0, warm_up: int = 16, only: str | None = None,
        phase_steps: int = 0) -> dict:  # fmt: skip
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    # as vLLM after start-up (freeze_gc_heap): the process's objects so far are never walked again
    # by a full collection; the manager's (and this run's model's) are
    gc.collect()
    gc.freeze()
    mgr = CacheManager(make_method("mosaic", **method), shape.layers, shape.kv_heads, shape.dim, dtype, device,
                       config)  # fmt: skip
    evict_tokens = config.evict_tokens
    try:
        rids = [f"seq{b}" for b in range(batch)]
        began = time.perf_counter()
        mgr.add_request(rids[0])
        for layer in range(shape.layers):
            k = torch.randn(
                context, shape.kv_heads, shape.dim, device=device, dtype=dtype
            )
            mgr.prefill(rids[0], layer, k, torch.randn_like(k))
        for rid in rids[1:]:
            mgr.fork(rids[0], rid)
        prefill_s = time.perf_counter() - began
        new = torch.randn(
            batch, 1, shape.kv_heads, shape.dim, device=device, dtype=dtype
        )
        # stagger the sequences' evictions over the steps
        for b, rid in enumerate(rids):
            for _ in range(b % evict_tokens):
                for layer in range(shape.layers):
                    mgr.append(rid, layer, new[b], new[b])

        layer_us: list[float] = []  # the current step's host time per layer call
        layer_at: list[float] = []  # and when each began

        def through_manager(layer: int, q: torch.Tensor) -> torch.Tensor:
            began = time.perf_counter()
            layer_at.append(began)
            if per_request:
                for b, rid in enumerate(rids):
                    mgr.append(rid, layer, new[b], new[b])
            else:
                mgr.append_batch(rids, layer, new[:, 0], new[:, 0])
            out = mgr.attend(rids, layer, q)
            layer_us.append((time.perf_counter() - began) * 1e6)
            return out

        model = Model(shape, device, dtype)
        tok = torch.randint(0, shape.vocab, (batch,), device=device)
        modes: dict[
            str, Callable[[Callable[[int, torch.Tensor], torch.Tensor]], object]
        ] = {"eager": lambda attend: model.step(tok, attend)}
        if cuda:
            modes["piecewise"] = PiecewiseStep(model, tok).step
        if only is not None:
            modes = {only: modes[only]}

        def frozen_kernels() -> Callable[[int, torch.Tensor], torch.Tensor]:
            """The same kernels over the manager's caches as they are now, frozen: each layer's
            tables built once from its snapshots (held: no re-encode frees what they read)."""
            held = [
                [mgr._stream(r, layer).acquire() for r in rids]
                for layer in range(shape.layers)
            ]
            readers.append(held)
            if not cuda:  # --smoke: the core reference over the same snapshots
                plans = [
                    DecodePlan([x.to_kvcache(mgr.method) for x in s], device)
                    for s in held
                ]
                return lambda layer, q: plans[layer].run(q)
            frozen = [
                snapshot_layout(s, [mgr.method] * batch, mgr.pool, shape.group)
                for s in held
            ]
            outs = [
                torch.empty(batch, shape.heads, shape.dim, device=device, dtype=dtype)
                for _ in frozen
            ]

            def kernels_only(layer: int, q: torch.Tensor) -> torch.Tensor:
                lay, ws = frozen[layer]
                return run_decode(lay, ws, q.contiguous(), outs[layer], shape.dim**-0.5)

            return kernels_only

        manager: dict[
            str, list[float]
        ] = {}  # per mode, ms per step (and the host's part)
        manager_host: dict[str, list[float]] = {}
        kernels: dict[str, list[float]] = {}
        kernels_host: dict[str, list[float]] = {}
        collections: dict[str, list[tuple[int, float]]] = {}
        backlog: dict[str, list[int]] = {mode: [] for mode in modes}  # after each step
        slowest: dict[str, list[list[float]]] = {mode: [] for mode in modes}
        early: dict[str, list[float]] = {mode: [] for mode in modes}
        readers: list[list[list[Snapshot]]] = []
        top = None
        # --pause-reencoders: the decode thread alone; jobs queue up (the backlog bound still holds)
        if paused:
            mgr.pause()
        for mode, step in modes.items():
            # the layers' evictions are staggered over evict_tokens steps; a stream's first eviction
            # also makes its first host chunk: --warm-up evict_tokens times only steady ones
            wall_times_ms(lambda step=step: step(through_manager), warm_up, cuda)
            kernels_only = frozen_kernels()
            wall_times_ms(lambda step=step, k=kernels_only: step(k), 4, cuda)
            timed = (
                (through_manager, manager, manager_host),
                (kernels_only, kernels, kernels_host),
            )
            for _, times, host in timed:
                times[mode], host[mode] = [], []
            # the two alternate step by step: the host's speed drifts within a run, and between
            # lease machines by 2x (bench/decode/README.md); both see the same drift
            layer_us.clear()  # the warm-up's
            layer_at.clear()
            with gc_pauses() as collections[mode], phases.reencode_jobs() as spans:
                for _ in range(steps):
                    for attend, times, host in timed:
                        times[mode] += wall_times_ms(
                            lambda step=step, a=attend: step(a), 1, cuda, host[mode]
                        )
                    backlog[mode].append(mgr.backlog_tokens)
                    # the step's slowest layer call, and which layer: the GPU waits on a slow
                    # call in an early layer, while the host is not yet far ahead of it
                    slowest[mode].append([max(layer_us), layer_us.index(max(layer_us))])
                    # re-encoder work while the host had no lead on the GPU yet: layers 0-7
                    early[mode].append(
                        phases.overlap_ms(
                            spans, layer_at[0], layer_at[min(8, len(layer_at) - 1)]
                        )
                    )
                    layer_us.clear()
                    layer_at.clear()
        if paused:
            mgr.resume()
        probed = None
        if (
            probe_steps and cuda
        ):  # the piecewise step (the last mode), device and host apart
            attends = {"manager": through_manager, "kernels": kernels_only}
            probed = queued_probe.probe(step, attends, probe_steps, sleep_ms=60.0)
            probed["kernels_by_device_time"] = {
                name: queued_probe.kernels_by_device_time(step, a, 2)
                for name, a in attends.items()
            }
        phased = None
        if phase_steps:  # the last mode's steps, re-encoders running, functions timed
            with phases.timing_phases() as totals:
                wall_times_ms(lambda: step(through_manager), phase_steps, cuda)
            phased = phases.report(totals)
        # the profile: the decode thread alone (cProfile sees every thread), re-encoders
        # drained, then paused; few enough steps that the backlog bound never stalls them
        if profile:
            mgr.drain()
            mgr.pause()
            prof = cProfile.Profile()
            prof.enable()
            wall_times_ms(lambda: step(through_manager), 16, cuda)
            prof.disable()
            mgr.resume()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(25)
            top = (
                f"{mode} steps, the decode thread (re-encoders paused):\n"
                + text.getvalue()
            )
        stats = mgr.stats()
        mgr.drain()  # a re-encoder's copies must not land in the capture below
        mgr.pause()
        kernels_graph = (
            time_ms(lambda: model.step(tok, kernels_only), cuda, 20) if cuda else None
        )
        mgr.resume()
        for held in readers:  # the frozen kernels' snapshots
            for layer, snaps in enumerate(held):
                for rid, snap in zip(rids, snaps, strict=True):
                    mgr._stream(rid, layer).release(snap)
    finally:
        mgr.close()
    row = {
        "context": context, "batch": batch, "steps": steps, "warm_up": warm_up,
        "threads": stats["cache_threads"],
        "host_spare_chunks": config.host_spare_chunks,
        "reencoders_paused": paused, "appends": "per-request" if per_request else "batch",
        "prefill_s": prefill_s, "kernels_graph_ms": kernels_graph,
        "backlog_peak": stats["cache_backlog_peak"], "backlog_limit": stats["cache_backlog_limit"],
        "stalls": stats["cache_backlog_stalls"],
        "reencodes": stats["cache_reencodes"],
        "steady_appends": stats["cache_steady_appends"], "steady_attends": stats["cache_steady_attends"],
        "defer_evictions": config.defer_evictions, "deferred_evictions": stats["cache_deferred_evictions"],
    }  # fmt: skip
    for mode in modes:
        m, k = manager[mode], kernels[mode]
        row[mode] = {
            "manager_ms_mean": statistics.fmean(m), "manager_ms_median": statistics.median(m),
            "manager_ms_max": max(m),
            "manager_ms_steps": m,
            "manager_host_ms_mean": statistics.fmean(manager_host[mode]),
            "manager_host_ms_steps": manager_host[mode],
            "backlog_tokens_steps": backlog[mode],
            "slowest_layer_call_steps": slowest[mode],  # [us, layer] per step
            "reencode_ms_in_layers_0_7_steps": early[mode],
            "kernels_host_ms_mean": statistics.fmean(kernels_host[mode]),
            "kernels_ms_mean": statistics.fmean(k), "kernels_ms_median": statistics.median(k),
            "overhead_ms": statistics.fmean(m) - statistics.fmean(k),
            "gc_collections": len(collections[mode]),
            "gc_full_collections": sum(g == 2 for g, _ in collections[mode]),
            "gc_ms_total": sum(ms for _, ms in collections[mode]),
            "gc_ms_max": max((ms for _, ms in collections[mode]), default=0.0),
        }  # fmt: skip
        row[mode]["overhead_of_step"] = row[mode]["overhead_ms"] / statistics.fmean(k)
        if kernels_graph:
            row[mode]["overhead_of_graph_step"] = (
                row[mode]["overhead_ms"] / kernels_graph
            )
    if top is not None:
        row["profile"] = top
    if probed is not None:
        row["probe"] = probed
    if phased is not None:
        row["phases"] = phased
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU re-encoders (default: the manager's)",
    )
    parser.add_argument(
        "--pause-reencoders",
        action="store_true",
        help="time the decode thread alone (CPU jobs wait; needs room for every eviction in "
        "--max-backlog-tokens)",
    )
    parser.add_argument(
        "--evict-tokens",
        type=int,
        default=MosaicSettings().evict_tokens,
        help="CacheConfig.evict_tokens (default: the vLLM backend's, MosaicSettings.evict_tokens)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval in seconds: how long a thread holds the GIL while another "
        "waits for it (Python's default: 0.005)",
    )
    parser.add_argument(
        "--max-backlog-tokens",
        type=int,
        default=CacheConfig().max_backlog_tokens,
        help="CacheConfig.max_backlog_tokens (--pause-reencoders needs room for every eviction)",
    )
    parser.add_argument(
        "--host-spare-chunks",
        type=int,
        default=CacheConfig().host_spare_chunks,
        help="CacheConfig.host_spare_chunks: pinned host chunks allocated ahead of need",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--warm-up",
        type=int,
        default=16,
        help="manager steps before each mode's timed steps (--evict-tokens or more: every stream "
        "of every layer has evicted once; time --evict-tokens steps then for a whole eviction cycle)",
    )
    parser.add_argument(
        "--mode",
        choices=["eager", "piecewise"],
        default=None,
        help="time one mode only",
    )
    parser.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="STEPS",
        help="STEPS more piecewise steps of each kind issued behind a sleep kernel: the step's "
        "device time apart from the host's, the calls that waited for the device, and the "
        "kernels by device time (queued_probe.py)",
    )
    parser.add_argument(
        "--phases",
        type=int,
        default=0,
        metavar="STEPS",
        help="STEPS more steps with the functions of an eviction call timed (phases.py): "
        "microseconds per eviction by function",
    )
    parser.add_argument(
        "--no-defer",
        action="store_true",
        help="CacheConfig.defer_evictions=False: each eviction runs in the layer call that makes "
        "it due (the ninth session's manager), for an A/B in one lease",
    )
    parser.add_argument(
        "--per-request-appends",
        action="store_true",
        help="one CacheManager.append per sequence and layer instead of append_batch",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU (checks the script)",
    )
    args = parser.parse_args()
    if not args.smoke and not cuda_available():
        parser.error(
            "needs a CUDA GPU and the built kernels (python -m mosaickv.ops.compile); or --smoke"
        )
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = Shape(**(SMOKE if args.smoke else LLAMA_8B))
    method = METHOD | {"segment_len": 256 if args.smoke else 65536}
    context = 1200 if args.smoke else args.context
    rows = []
    for b in args.batches:
        with torch.inference_mode():  # as vLLM's model runner decodes
            row = run(
                shape,
                context,
                b,
                4 if args.smoke else args.steps,
                CacheConfig(
                    page_bytes=4096,
                    evict_tokens=args.evict_tokens,
                    n_threads=args.threads,
                    max_backlog_tokens=args.max_backlog_tokens,
                    host_spare_chunks=args.host_spare_chunks,
                    defer_evictions=not args.no_defer,
                ),
                args.pause_reencoders,
                args.profile,
                args.per_request_appends,
                device,
                method,
                args.probe,
                args.warm_up,
                args.mode,
                args.phases,
            )
        rows.append(row)
        print(
            json.dumps(
                {k: v for k, v in row.items() if k not in ("profile", "phases")}
            ),
            flush=True,
        )
        for p in row.get("phases", []):
            print(
                f"{p['phase']:<48} {p['calls']:>6} calls {p['us_per_eviction']:>9.1f} us/eviction",
                flush=True,
            )
        if "profile" in row:
            print(row["profile"], flush=True)
    doc = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), **host_cpu(), "torch": torch.__version__,
           "shape": vars(shape), "method": method, "evict_tokens": args.evict_tokens,
           "switch_interval_s": sys.getswitchinterval(), "gc_frozen": True, "alternating": True, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
