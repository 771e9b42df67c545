"""Where a host-bound decode step's time goes, split into the device's part and the host's
(``bench_manager_step.py --probe``, CUDA only).

Each probed step is issued behind a sleep kernel that outlasts the host's work for the step, so:
  - the device runs the whole step from its queue: the time between an event after the sleep and
    one after the step is the step's own device time, with no gap waiting for the host;
  - a host call that waits for the device (a blocking copy, a synchronisation, an allocation that
    synchronises) cannot return before the sleep ends, so it shows as a call longer than the sleep.
Then a few steps of each kind under torch.profiler give the device time per kernel name.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Attend = Callable[[int, torch.Tensor], torch.Tensor]
Step = Callable[[Attend], object]


def sleep_cycles_per_ms() -> float:
    """The clock of ``torch.cuda._sleep``: cycles per millisecond, timed with events."""
    cycles = 20_000_000
    torch.cuda._sleep(1000)  # load the kernel
    start, end = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def timed_calls(attend: Attend, calls: list[float]) -> Attend:
    """``attend`` that appends the host microseconds of each call to ``calls``."""

    def timed(layer: int, q: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        out = attend(layer, q)
        calls.append((time.perf_counter() - began) * 1e6)
        return out

    return timed


def probe(step: Step, attends: dict[str, Attend], steps: int, sleep_ms: float) -> dict:
    """``steps`` steps of each of ``attends`` (alternating), each behind a ``sleep_ms`` sleep: the
    device ms per step, the host ms per step, and every layer call that outlasted half the sleep
    (it waited for the device)."""
    cycles = int(sleep_ms * sleep_cycles_per_ms())
    device: dict[str, list[float]] = {name: [] for name in attends}
    host: dict[str, list[float]] = {name: [] for name in attends}
    calls: dict[str, list[float]] = {name: [] for name in attends}
    waited: list[dict] = []
    for i in range(steps):
        for name, attend in attends.items():
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)
            start, end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start.record()
            first = len(calls[name])
            began = time.perf_counter()
            step(timed_calls(attend, calls[name]))
            host[name].append((time.perf_counter() - began) * 1e3)
            end.record()
            end.synchronize()
            device[name].append(start.elapsed_time(end))
            for layer, us in enumerate(calls[name][first:]):
                if us > sleep_ms * 1e3 / 2:
                    waited.append({"attend": name, "step": i, "layer": layer, "us": us})
    out: dict = {"sleep_ms": sleep_ms, "steps": steps, "waited": waited}
    for name in attends:
        out[name] = {
            "device_ms_mean": statistics.fmean(device[name]),
            "device_ms_median": statistics.median(device[name]),
            "host_ms_mean": statistics.fmean(host[name]),
            "host_ms_max": max(host[name]),
            "call_us_median": statistics.median(calls[name]),
            "call_us_p90": statistics.quantiles(calls[name], n=10)[-1],
        }
    return out


def kernels_by_device_time(
    step: Step, attend: Attend, steps: int, top: int = 15
) -> list[dict]:
    """The ``top`` kernels (and copies) of ``steps`` steps by device time, per step, from
    torch.profiler; an empty list where the profiler cannot see the device (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(attend)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append(
                {
                    "name": e.key[:90],
                    "us_per_step": us / steps,
                    "calls_per_step": e.count / steps,
                }
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]
