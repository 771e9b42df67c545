"""Where the host time goes around the manager's calls, for bench_manager_step.py:
- ``timing_phases`` (``--phases``): named functions wrapped with a timer for a few steps. Unlike
  cProfile, only the functions named are wrapped, so the rest of the step runs at full speed and the
  re-encoder threads keep running; each figure is inclusive (a phase that calls another counts it
  too) and counts only the calls of the thread that started the timers.
- ``reencode_jobs``: when the re-encoders' jobs ran, to set against the decode thread's layers.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mosaickv.cache.manager as manager_module
import mosaickv.cache.stream as stream_module
import mosaickv.cache.tables as tables_module
import mosaickv.cache.temp as temp_module
import torch
from mosaickv.cache.host import HostBuffer, HostChunks
from mosaickv.cache.segments import DenseRows
from mosaickv.cache.steady import SteadyBatch
from mosaickv.ops import DecodeWorkspace

EVICTION = (
    "manager._moving_out (one eviction)"  # every eviction passes through it, once
)

# (owner, attribute, label): what an eviction call does on the decode thread, and around it
TARGETS: list[tuple[Any, str, str]] = [
    (manager_module.CacheManager, "_moving_out", EVICTION),
    (
        manager_module.CacheManager,
        "_run_due",
        "manager._run_due (deferred, with next tables)",
    ),
    (
        manager_module.CacheManager,
        "_prepare",
        "  _prepare (the layer's next batch, tables)",
    ),
    (
        manager_module.CacheManager,
        "_tables",
        "manager._tables (kernel tables, any call)",
    ),
    (manager_module, "snapshot_layout", "  snapshot_layout"),
    (tables_module, "closed_tables", "    closed_tables"),
    (tables_module, "temp_tables", "    temp_tables"),
    (tables_module, "to_device", "    to_device (tables)"),
    (tables_module, "with_dense", "    with_dense"),
    (DecodeWorkspace, "sized", "    DecodeWorkspace.sized"),
    (manager_module, "dense_batch", "  dense_batch"),
    (SteadyBatch, "hold", "  SteadyBatch.hold"),
    (stream_module.Stream, "_evict", "Stream._evict (the move)"),
    (DenseRows, "appended", "  DenseRows.appended"),
    (DenseRows, "oldest", "  DenseRows.oldest"),
    (DenseRows, "without_oldest", "  DenseRows.without_oldest"),
    (temp_module.TempSegment, "append", "  TempSegment.append"),
    (temp_module.TempSegment, "_reserve_blocks", "    _reserve_blocks"),
    (temp_module, "grow_stripes", "    grow_stripes"),
    (temp_module.TempTables, "update", "    TempTables.update"),
    (temp_module.TempTables, "_new_entries", "      TempTables._new_entries"),
    (temp_module.TempTables, "_build", "      TempTables._build"),
    (temp_module.TempTables, "_set_rows", "      TempTables._set_rows"),
    (temp_module, "to_device", "      to_device (temp)"),
    (temp_module, "append_encode", "    append_encode (launch)"),
    (temp_module.TempSegment, "view", "  TempSegment.view"),
    (HostBuffer, "push", "  HostBuffer.push"),
    (HostChunks, "_new", "    HostChunks._new (pinned allocation)"),
    (torch.cuda.Event, "record", "  cuda Event.record"),
    (manager_module, "run_decode", "run_decode (every layer call)"),
]


@contextmanager
def timing_phases() -> Iterator[dict[str, list[float]]]:
    """While the block runs, every TARGET called on this thread adds (calls, seconds) to its label."""
    totals: dict[str, list[float]] = {label: [0, 0.0] for _, _, label in TARGETS}
    thread = threading.get_ident()
    saved = []
    for owner, name, label in TARGETS:
        original = (
            owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        )
        saved.append((owner, name, original))
        if isinstance(original, classmethod):
            timed = classmethod(_timed(original.__func__, totals[label], thread))
        else:
            timed = _timed(original, totals[label], thread)
        setattr(owner, name, timed)
    try:
        yield totals
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _timed(fn: Any, total: list[float], thread: int) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != thread:
            return fn(*args, **kwargs)
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += 1
            total[1] += time.perf_counter() - began

    return call


def report(totals: dict[str, list[float]]) -> list[dict[str, float | str]]:
    """Rows of label, calls, total ms and microseconds per eviction (the ``EVICTION`` calls)."""
    per = max(int(totals[EVICTION][0]), 1)
    return [
        {
            "phase": label,
            "calls": int(n),
            "ms": s * 1e3,
            "us_per_eviction": s * 1e6 / per,
        }
        for label, (n, s) in totals.items()
    ]


@contextmanager
def reencode_jobs() -> Iterator[list[tuple[float, float]]]:
    """(start, end) host times of the re-encoders' jobs (``Stream.process``) while the block runs,
    from after the job's device-to-host copy has landed (its wait holds no lock and no GIL)."""
    spans: list[tuple[float, float]] = []
    process = stream_module.Stream.process

    def timed(stream: stream_module.Stream, n: int, event: Any) -> None:
        if event is not None:
            event.synchronize()
        began = time.perf_counter()
        try:
            process(stream, n, event)
        finally:
            spans.append((began, time.perf_counter()))

    stream_module.Stream.process = timed
    try:
        yield spans
    finally:
        stream_module.Stream.process = process


def overlap_ms(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """Milliseconds of [a, b] that the spans cover (summed: spans on several threads count each)."""
    return sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans) * 1e3
