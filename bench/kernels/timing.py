"""The timing helpers of bench/: CUDA-graph replay timed with CUDA events (the device's time), and
synchronised wall time (what a caller waits for, host work included)."""

import os
import platform
import time
from collections.abc import Callable

import torch


def wall_times_ms(
    fn: Callable[[], object], repeats: int, cuda: bool, host: list[float] | None = None
) -> list[float]:
    """Wall milliseconds of each of ``repeats`` calls of fn, each call between two device
    synchronisations when ``cuda`` (on CPU there is nothing to wait for). ``host`` receives the
    milliseconds until fn returned, before the synchronisation: the host's own time per call (a
    step whose host time is below its wall time kept the device waiting on nothing)."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if host is not None:
            host.append((time.perf_counter() - began) * 1e3)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return times


def graph_time_ms(
    fn: Callable[[], object], repeats: int = 30, calls_per_graph: int = 1
) -> float:
    """Median milliseconds of one ``fn`` call, from CUDA-graph replays timed with events.

    ``fn`` is warmed up eagerly, captured ``calls_per_graph`` times in one graph (callers cycle over
    several distinct inputs inside ``fn`` so that the working set exceeds the L2 cache), and the
    graph is replayed ``repeats`` times; each replay's time is divided by ``calls_per_graph``.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(n_bytes: int = 4 << 30, repeats: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written: through a
    copy kernel (elementwise, what our kernels compete with) and through cudaMemcpy (copy engines
    when captured in a graph)."""
    src = torch.randn(n_bytes // 8, device="cuda")
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    kernel_ms = graph_time_ms(lambda: torch.mul(src, 1.0, out=dst), repeats)
    memcpy_ms = graph_time_ms(lambda: dst.copy_(src), repeats)
    return {
        "kernel": moved / (kernel_ms * 1e-3) / 1e9,
        "memcpy": moved / (memcpy_ms * 1e-3) / 1e9,
    }


def host_cpu() -> dict[str, object]:
    """The host's CPU model and the cores this process may use (the decode thread's speed, which
    sets a host-bound step's pace, differs between machines of one kind)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in f
                    if line.startswith("model name")
                ),
                model,
            )
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0))}
