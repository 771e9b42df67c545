"""The cache manager: every request's per-layer streams, one page pool, the CPU re-encoder pool,
the backlog bound and the byte accounting. Engines adapt to it (see the package docstring)."""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import torch

from mosaickv.cache.dense_batch import DenseBatch, dense_batch
from mosaickv.cache.host import SPARE_CHUNKS, HostChunks
from mosaickv.cache.pages import Paged, PagePool, page_ids
from mosaickv.cache.segments import PagedSegment, Snapshot
from mosaickv.cache.steady import SteadyBatch
from mosaickv.cache.stream import Stream
from mosaickv.cache.tables import pages_readable, snapshot_layout, table_key, with_dense
from mosaickv.core import CompressionMethod, KVCache, Segment, make_method
from mosaickv.ops import DecodeLayout, DecodePlan, DecodeWorkspace, cuda_available, run_decode

P = ParamSpec("P")
R = TypeVar("R")


def _inference(method: Callable[P, R]) -> Callable[P, R]:
    """Run a manager call in ``torch.inference_mode``, entering it only when the caller is not
    already in it (engines decode in it): the decorator form builds and enters a new context on
    every call, and decode calls the manager per layer and sequence."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            return method(*args, **kwargs)

    return call


def default_threads() -> int:
    """CPU re-encoder threads: the cores this process may use, less one for the decode loop."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass(frozen=True)
class CacheConfig:
    """Manager knobs.

    page_bytes: bytes per page; None picks 4 KiB for segments under 16K tokens, else 16 KiB (the
    lowest waste in docs/CACHE.md's table). chunk_pages: pages per device allocation.
    max_pages: pool bound (None: grow on demand). n_threads: CPU re-encoder threads (None:
    ``default_threads()``). max_backlog_tokens: pending tokens queued for the CPU and not yet
    processed, over all streams; an append that would pass it waits (the temporary segments keep
    serving meanwhile). reencode_delay_s: extra seconds per re-encode, to model a slow CPU.
    evict_tokens: decode tokens leave the dense window for the temporary segment this many at a time
    (the window holds up to window + evict_tokens - 1 tokens): the temporary segment's encode, the
    host copy and the CPU job then run once every evict_tokens steps of a sequence instead of every
    step. 1 keeps the synchronous core's token-by-token order; a block (8) amortises the decode-path
    cost (bench/decode/README.md). append_kernel: on a GPU with the kernels built, encode the
    tokens that leave the window with one ``append_encode`` launch into the pages (False: the
    torch path, for A/B runs). host_spare_chunks: pinned host chunks (one eviction's raw K/V each) kept
    allocated ahead of need, topped up by the re-encoders (``HostChunks``). defer_evictions: an
    eviction that ``append_batch`` makes due runs after the attention launch of the step's last
    layer, where the host is furthest ahead of the device, and prepares that layer's next step
    (docs/CACHE.md, "Deferred evictions"); False: in the call that makes it due.
    """

    page_bytes: int | None = None
    chunk_pages: int = 256
    max_pages: int | None = None
    n_threads: int | None = None
    max_backlog_tokens: int = 4096
    reencode_delay_s: float = 0.0
    evict_tokens: int = 1
    append_kernel: bool = True
    host_spare_chunks: int = SPARE_CHUNKS
    defer_evictions: bool = True

    def __post_init__(self) -> None:
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be >= 1 (or None for the default), got {self.n_threads}")
        if self.max_backlog_tokens < 1:
            raise ValueError(f"max_backlog_tokens must be >= 1, got {self.max_backlog_tokens}")
        if self.reencode_delay_s < 0:
            raise ValueError(f"reencode_delay_s must be >= 0, got {self.reencode_delay_s}")
        if self.evict_tokens < 1:
            raise ValueError(f"evict_tokens must be >= 1, got {self.evict_tokens}")
        if self.host_spare_chunks < 0:
            raise ValueError(f"host_spare_chunks must be >= 0, got {self.host_spare_chunks}")


class CacheManager:
    """Compressed paged KV caches of many requests x layers, re-encoded by a pool of CPU threads.

    Every tensor the manager makes or updates is made in ``torch.inference_mode`` (inference mode is
    per thread: the decode thread and the re-encoders must agree, whatever mode the caller runs in).

    Args:
        method: a "mosaic" CompressionMethod (the manager stores bitmap-layout segments): the
            default of every (request, layer); ``add_request`` may give a request its own per layer.
        n_layers: L. n_kv_heads: H_kv. head_dim: D. dtype: storage dtype. device: where pages live.
        config: CacheConfig.
        storage: memory the caller owns for the pages (``PagePool``'s storage, e.g. vLLM's KV cache
            blocks); the pool then never allocates and ``config.max_pages``/``chunk_pages`` are unused.
    """

    def __init__(
        self,
        method: CompressionMethod,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        config: CacheConfig | None = None,
        storage: Sequence[torch.Tensor] = (),
    ) -> None:
        _check_method(method)
        if n_layers < 1 or n_kv_heads < 1 or head_dim < 1:
            raise ValueError(
                f"n_layers, n_kv_heads and head_dim must be >= 1, got {n_layers}, {n_kv_heads}, {head_dim}"
            )
        self.method, self.n_layers, self.n_kv_heads, self.head_dim = method, n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, _concrete(torch.device(device))
        self.config = config or CacheConfig()
        page_bytes = self.config.page_bytes or (4096 if method.segment_len < 16384 else 16384)
        self.pool = PagePool(page_bytes, self.device, self.config.chunk_pages, self.config.max_pages, storage)
        # attention runs the CUDA kernels when they are built, else the core reference on the device
        kernels = self.device.type == "cuda" and cuda_available()
        self._plan_device = self.device if kernels else torch.device("cpu")
        # raw K/V of pending tokens, in chunks of at least one eviction
        pin, spare = self.device.type == "cuda", self.config.host_spare_chunks
        self._host = HostChunks(max(256, self.config.evict_tokens), n_kv_heads, head_dim, dtype, pin, spare)
        self._host.top_up()
        self._requests: dict[str, list[Stream]] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._backlog = 0
        self._backlog_peak = 0
        self._stalls = 0
        self._stall_s = 0.0
        self._errors: list[BaseException] = []
        self._paused = False
        self._running = True
        self._reencodes_freed = 0
        self._freed_busy: list[Stream] = []  # freed while queued for or held by a re-encoder
        self._prefix: dict[bytes, PagedSegment] = {}  # prompt segments by hash of the tokens up to their end
        self._prefix_hits = 0
        self._queue: queue.SimpleQueue[Stream | None] = queue.SimpleQueue()
        self._readable: weakref.WeakKeyDictionary[CompressionMethod, bool] = weakref.WeakKeyDictionary()
        # per layer: (table_key of the last call's snapshots, their layout, its workspace)
        self._layer_tables: dict[int, tuple[tuple[object, ...], DecodeLayout, DecodeWorkspace]] = {}
        # per layer: the dense rows of its last batch, on the device (``append_batch``, ``attend``)
        self._dense: dict[int, DenseBatch | None] = {}
        # per layer: the batch whose steady steps skip the per-sequence work (``SteadyBatch``)
        self._steady: dict[int, SteadyBatch] = {}
        self._steady_appends = self._steady_attends = 0
        # per layer: the streams of a batch in which ``append_batch`` made an eviction due
        self._due: dict[int, list[Stream]] = {}
        self._deferred = 0
        row_bytes = head_dim * torch.empty(0, dtype=dtype).element_size()
        # append_batch's one-launch row writes: the kernel, or on the CPU its reference
        self._batch_rows = row_bytes % 16 == 0 and (kernels or self.device.type == "cpu")
        self.n_threads = self.config.n_threads or default_threads()
        self._threads = [
            threading.Thread(target=self._worker, name=f"mosaickv-reencode-{i}", daemon=True)
            for i in range(self.n_threads)
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def for_model(
        cls,
        config: object,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        cache_config: CacheConfig | None = None,
        **method_params: object,
    ) -> CacheManager:
        """From a transformers model config (num_hidden_layers, num_key_value_heads, head_dim)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            make_method("mosaic", **method_params),
            config.num_hidden_layers,
            kv,
            dim,
            dtype,
            device,
            cache_config,
        )

    # ---- requests ---------------------------------------------------------------------------------
    @_inference
    def add_request(self, request_id: str, methods: Sequence[CompressionMethod] | None = None) -> None:
        """Open a request's cache. ``methods``: one "mosaic" method per layer (a per-request fitted
        keep ratio, a per-layer policy); default: the manager's method for every layer."""
        if methods is None:
            methods = [self.method] * self.n_layers
        if len(methods) != self.n_layers:
            raise ValueError(f"methods must have one method per layer ({self.n_layers}), got {len(methods)}")
        for m in methods:
            _check_method(m)
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} already has a cache; free it first")
            # the layers' first evictions are spread over evict_tokens steps: with one token per
            # step, each step then carries the eviction work of 1 / evict_tokens of the layers
            # instead of one step in evict_tokens carrying all of it (bench/decode/README.md)
            phases = [layer * self.config.evict_tokens // self.n_layers for layer in range(self.n_layers)]
            self._requests[request_id] = [
                Stream(
                    m, self.pool, self.n_kv_heads, self.head_dim, self.dtype, self.config, self._host, phase
                )
                for m, phase in zip(methods, phases, strict=True)
            ]

    def _stream(self, request_id: str, layer: int) -> Stream:
        """A request's stream in one layer, its snapshot showing every row appended so far."""
        self._raise_errors()
        streams = self._requests.get(request_id)
        if streams is None:
            raise ValueError(f"no cache for request {request_id!r}; call add_request first")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        self._publish(layer)
        return streams[layer]

    def _publish(self, layer: int) -> None:
        """Give the snapshots of the layer's steady batch the rows its steady appends wrote."""
        steady = self._steady.get(layer)
        if steady is not None:
            steady.publish()

    def _drop_steady(self, layer: int | None = None) -> None:
        """Forget a layer's steady batch (every layer's if None), its rows published first: its
        streams' dense rows are about to change some other way."""
        for key in list(self._steady) if layer is None else [layer]:
            steady = self._steady.pop(key, None)
            if steady is not None:
                steady.publish()
                steady.release()

    def _streams(self, request_ids: Sequence[str], layer: int) -> list[Stream]:
        """A batch's streams in one layer (the general paths; steady steps keep theirs)."""
        return [self._stream(r, layer) for r in request_ids]

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (self.n_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 3 or tuple(x.shape[1:]) != want or x.dtype != self.dtype or x.device != self.device:
                raise ValueError(
                    f"{name} must be [t, {want[0]}, {want[1]}] {self.dtype} on {self.device}, "
                    f"got {tuple(x.shape)} {x.dtype} on {x.device}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")

    @_inference
    def prefill(
        self,
        request_id: str,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        """Encode a prompt's K/V for one layer: k, v [T, H_kv, D] post-RoPE, storage dtype, on device.

        With ``token_ids`` (the T prompt tokens), each prompt segment is looked up by the tokens up
        to its end: a request with the same prefix shares its pages instead of storing a copy
        (docs/CACHE.md, "Prefix sharing").
        """
        self._check_kv(k, v)
        stream = self._stream(request_id, layer)
        self._drop_steady(layer)
        if token_ids is not None and len(token_ids) != k.shape[0]:
            raise ValueError(f"token_ids has {len(token_ids)} ids for {k.shape[0]} tokens of K/V")
        if token_ids is None:
            stream.prefill(k, v)
            return
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()
        salt = f"{layer}|{self.dtype}|{stream.method!r}|".encode()

        def page(seg: Segment, start: int) -> PagedSegment:
            key = hashlib.sha256(salt + ids[: 8 * (start + seg.length)]).digest()
            with self._lock:
                held = self._prefix.get(key)
                if held is not None:
                    self._prefix_hits += 1
                    return held.shared()
            fresh = PagedSegment.from_core(seg, start, self.pool, self.dtype, stream.method.block_size)
            with self._lock:
                self._prefix.setdefault(key, fresh.shared())
            return fresh

        stream.prefill(k, v, page)

    @_inference
    def append(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add decode tokens k, v: [t, H_kv, D] for one layer. Returns at once unless the CPU backlog is
        at ``max_backlog_tokens``, then waits for the re-encoders (counted as a stall in stats)."""
        self._check_kv(k, v)
        stream = self._stream(request_id, layer)
        self._drop_steady(layer)  # this stream's rows change here, not through the batch's table
        self._evict(stream)  # one ``append_batch`` deferred (its buffer has no room past that row)
        dense = stream.snapshot.dense
        need = stream.evicted(dense.n - dense.n_sink + k.shape[0])
        if not need:  # most steps: nothing leaves the window, so no job and no backlog to reserve
            stream.append(k, v)
            return
        self._moving_out(stream, need, lambda: stream.append(k, v))

    def _evict(self, stream: Stream) -> bool:
        """Run the stream's due eviction, if any (``Stream.evict``); whether there was one."""
        need = 0 if stream.freed else stream.due_tokens()
        if need:
            self._moving_out(stream, need, stream.evict)
        return need > 0

    def _moving_out(self, stream: Stream, need: int, move: Callable[[], int]) -> None:
        """Run ``move``, an append or eviction of ``stream`` that makes at most ``need`` tokens
        pending, with the backlog reserved first: at ``max_backlog_tokens`` it waits for the
        re-encoders (counted as a stall in stats). Queues the CPU job."""
        with self._cond:
            if self._backlog and self._backlog + need > self.config.max_backlog_tokens:
                self._stalls += 1
                began = time.perf_counter()
                self._cond.wait_for(
                    lambda: (
                        not self._backlog
                        or self._errors
                        or self._backlog + need <= self.config.max_backlog_tokens
                    )
                )
                self._stall_s += time.perf_counter() - began
            self._backlog += need  # reserved before the job exists, so the bound always holds
            self._backlog_peak = max(self._backlog_peak, self._backlog)
        out = move()
        with self._cond:
            self._backlog -= need - out  # the reservation is an upper bound (sinks take the first tokens)
        if out:
            self._schedule(stream)

    @_inference
    def append_batch(self, request_ids: Sequence[str], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One decode token per request for one layer: k, v [B, H_kv, D], row b for
        ``request_ids[b]``; the same as ``append(request_ids[b], layer, k[b : b + 1], v[b : b + 1])``
        for each b. The rows that only grow their window are written in one launch through the
        layer's ``DenseBatch``, which attention then reads (no upload while the batch and its
        buffers stay the same; ``append`` per request costs two copies each, and at batch 8 eight
        times the Python; on the CPU the launch is its reference); sinks go through ``append``.
        With ``config.defer_evictions`` a row that makes an eviction due is written the same way and
        the eviction waits for the step's last layer (``_run_due``); else it goes through
        ``append``. Until one of those, the layer's ``SteadyBatch`` makes the launch alone."""
        self._check_kv(k, v)
        steady = self._steady.get(layer)
        if steady is not None and k.shape[0] == len(steady.request_ids) and steady.serves(request_ids):
            self._raise_errors()
            if steady.append(k, v):
                self._steady_appends += 1
                if not steady.room and self.config.defer_evictions:  # its last row made one due
                    self._due[layer] = steady.streams
                return
        if k.shape[0] != len(request_ids) or len(set(request_ids)) != len(request_ids):
            raise ValueError(
                f"append_batch needs one row of k/v per request, each request once: got {k.shape[0]} rows "
                f"for requests {list(request_ids)}"
            )
        streams = self._streams(request_ids, layer)
        self._drop_steady(layer)
        rows = [s.window_row() if self._batch_rows else None for s in streams]
        for b, d in enumerate(rows):
            if d is None:  # sinks to fill, tokens leaving the window: the general path
                self.append(request_ids[b], layer, k[b : b + 1], v[b : b + 1])
        through = [d is not None for d in rows]
        dense = [d if d is not None else s.snapshot.dense for s, d in zip(streams, rows, strict=True)]
        # rows written by ``append`` are marked to skip; if that was all of them, no launch: the table
        # (of the rows as they are now) serves the steps after this one
        skip = [not x for x in through] if any(through) else []
        batch = dense_batch(dense, self._dense.get(layer), skip, single=True)
        if batch is None:  # buffers of several sizes (one outgrew its cap): an append each
            for b, d in enumerate(rows):
                if d is not None:
                    self.append(request_ids[b], layer, k[b : b + 1], v[b : b + 1])
            return
        if any(through):
            batch.append(k, v)
            for stream, d in zip(streams, rows, strict=True):
                if d is not None:
                    stream.set_rows(d.buf, d.n + 1)
        self._dense[layer] = batch  # attention reads it as it is, unless a sequence changed since
        self._steady[layer] = SteadyBatch(request_ids, streams, batch)
        if self.config.defer_evictions and any(s.due_tokens() for s in streams):
            self._due[layer] = streams

    @_inference
    def _run_due(self) -> None:
        """Run the evictions ``append_batch`` deferred, and give each of their layers the dense
        table and kernel tables of its next step, held by a new ``SteadyBatch``: at the last layer,
        after its attention launch, the host is furthest ahead of the device, so neither the
        eviction (an append kernel, a host copy, a new dense buffer) nor the rebuilt tables delay
        the device at the early layers they belong to."""
        due, self._due = self._due, {}
        for layer, streams in due.items():
            steady = self._steady.get(layer)
            if steady is not None and steady.streams is not streams:
                steady = None  # the layer's batch changed since: nothing to prepare
            group = steady.held_group if steady is not None else 0  # before the drop releases it
            self._drop_steady(layer)
            self._deferred += sum(self._evict(s) for s in streams)
            if steady is not None and not any(s.freed for s in streams):
                self._prepare(layer, steady.request_ids, streams, group)

    def _prepare(self, layer: int, request_ids: Sequence[str], streams: list[Stream], group: int) -> None:
        """Make the layer's steady batch of these streams as they are now, with the kernel tables
        for ``group`` query heads per KV head (none: 0, or attention without the kernels)."""
        batch = dense_batch([s.snapshot.dense for s in streams], self._dense.get(layer), single=True)
        if batch is None:
            return
        self._dense[layer] = batch
        steady = self._steady[layer] = SteadyBatch(request_ids, streams, batch)
        methods = [s.method for s in streams]
        if not group or self._plan_device.type != "cuda" or not all(self._pages_readable(m) for m in methods):
            return
        snaps = [s.acquire() for s in streams]
        kept = False
        try:
            kept = steady.hold(snaps, *self._tables(layer, snaps, methods, group), group)
        finally:
            if not kept:
                for s, snap in zip(streams, snaps, strict=True):
                    s.release(snap)

    def _schedule(self, stream: Stream) -> None:
        with stream.lock:
            if stream.scheduled or not stream.jobs:
                return
            stream.scheduled = True
        self._queue.put(stream)

    @_inference
    def fork(self, src_id: str, dst_id: str) -> None:
        """Start request dst as a copy of src (parallel sampling, beam search): closed segments are
        shared page for page, the rest copied. Waits for src's queued re-encodes first."""
        self._run_due()
        src = [self._stream(src_id, layer) for layer in range(self.n_layers)]
        with self._cond:
            self._cond.wait_for(lambda: self._errors or all(not s.jobs and not s.scheduled for s in src))
        self._raise_errors()
        twins = [s.fork() for s in src]
        with self._lock:
            if dst_id in self._requests:
                for t in twins:
                    t.free()
                raise ValueError(f"request {dst_id!r} already has a cache; free it first")
            self._requests[dst_id] = twins

    def free(self, request_id: str) -> None:
        """Release a request's cache: every page returns to the pool (after any live reader)."""
        self._drop_steady()  # the other requests of its batches keep their rows
        with self._lock:
            streams = self._requests.pop(request_id, None)
        if streams is None:
            raise ValueError(f"no cache for request {request_id!r}")
        for s in streams:
            dropped = s.free()
            with self._cond:
                self._reencodes_freed += s.reencodes
                self._backlog -= dropped
                # Its host rows come back when the re-encoder lets go of it (drain waits for that);
                # pruned here, the list holds only streams a re-encoder held at the last free.
                self._freed_busy = [x for x in self._freed_busy if x.scheduled] + ([s] if s.scheduled else [])
                self._cond.notify_all()
        self._layer_tables.clear()  # they reference the freed request's segments
        self._dense.clear()  # and its dense buffers
        self._evict_prefixes()

    def _evict_prefixes(self) -> None:
        """Drop prefix entries no request uses any more (the entry is the pages' only owner)."""
        with self._lock:
            for key, seg in list(self._prefix.items()):
                if all((self.pool.owners(st.pages) == 1).all() for st in seg.paged()):
                    for st in seg.paged():
                        st.release()
                    del self._prefix[key]

    # ---- attention --------------------------------------------------------------------------------
    @_inference
    def attend(
        self, request_ids: list[str], layer: int, q: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """Decode attention for one layer over a batch: q [B, H_q, D] post-RoPE -> [B, H_q, D].

        Each request's cache is read from one snapshot (never a half-swapped state). With the CUDA
        kernels built, they read the pages in place through page tables (``cache.tables``);
        otherwise (or for caches that attend every block) ``mosaickv.ops.DecodePlan`` runs the
        core reference over the snapshot's rows.
        """
        out = self._attend(request_ids, layer, q, scale)
        if layer == self.n_layers - 1 and self._due:  # its launch is queued: the host is furthest ahead
            self._run_due()
        return out

    def _attend(
        self, request_ids: list[str], layer: int, q: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        group = q.shape[1] // self.n_kv_heads
        sc = self.head_dim**-0.5 if scale is None else float(scale)
        steady = self._steady.get(layer)
        held = steady.layout(group) if steady is not None and steady.serves(request_ids) else None
        if held is not None:  # nothing swapped in or left a window since it was built
            self._raise_errors()
            self._steady_attends += 1
            return run_decode(*held, q.contiguous(), torch.empty_like(q), sc)
        streams = self._streams(request_ids, layer)
        snaps = [s.acquire() for s in streams]
        kept = False
        try:
            methods = [s.method for s in streams]
            if self._plan_device.type == "cuda" and all(self._pages_readable(m) for m in methods):
                layout, ws = self._tables(layer, snaps, methods, group)
                steady = self._steady.get(layer)
                if steady is not None and steady.serves(request_ids):
                    kept = steady.hold(snaps, layout, ws, group)  # the snapshots go with the layout
                return run_decode(layout, ws, q.contiguous(), torch.empty_like(q), sc)
            caches = [snap.to_kvcache(s.method) for s, snap in zip(streams, snaps, strict=True)]
            return DecodePlan(caches, self._plan_device).run(q, scale)
        finally:
            if not kept:
                for s, snap in zip(streams, snaps, strict=True):
                    s.release(snap)

    def _pages_readable(self, m: CompressionMethod) -> bool:
        """``tables.pages_readable`` for this manager's pages, once per method object."""
        known = self._readable.get(m)
        if known is None:
            known = self._readable[m] = pages_readable(m, self.head_dim, self.dtype, self.pool)
        return known

    def _tables(
        self, layer: int, snaps: list[Snapshot], methods: list[CompressionMethod], group: int
    ) -> tuple[DecodeLayout, DecodeWorkspace]:
        """The layer's kernel tables and workspace for these snapshots: rebuilt only when a segment
        swapped in or tokens left a window since the layer's last call; the dense part through the
        layer's ``DenseBatch`` (the one ``append_batch`` advanced, when it still describes them)."""
        batch = dense_batch([s.dense for s in snaps], self._dense.get(layer))
        self._dense[layer] = batch
        key = table_key(snaps)
        held = self._layer_tables.get(layer)
        stale = held is None or len(held[0]) != len(key) or held[2].qrot.shape[1] != group
        if stale or any(a is not b for a, b in zip(held[0], key, strict=True)):
            reuse = None if held is None else held[2]
            held = (key, *snapshot_layout(snaps, methods, self.pool, group, reuse, batch))
            self._layer_tables[layer] = held
            return held[1], held[2]  # joined with this batch already
        return with_dense(held[1], snaps, batch), held[2]

    @contextmanager
    def view(self, request_id: str, layer: int) -> Iterator[KVCache]:
        """One (request, layer) cache as a core KVCache of one snapshot, exactly what ``attend``
        reads (telemetry, tests); no re-encode frees its pages until the block ends. Deferred
        evictions run first."""
        self._run_due()
        stream = self._stream(request_id, layer)
        snap = stream.acquire()
        try:
            yield snap.to_kvcache(stream.method)
        finally:
            stream.release(snap)

    @property
    def backlog_tokens(self) -> int:
        """Tokens queued for the re-encoders now (``stats`` has it too, with everything else)."""
        return self._backlog

    def tokens(self, request_id: str, layer: int = 0) -> int:
        """Tokens held for the request in one layer."""
        return self._stream(request_id, layer).snapshot.length

    # ---- CPU pool ---------------------------------------------------------------------------------
    @torch.inference_mode()  # its own thread, which starts outside inference mode
    def _worker(self) -> None:
        while True:
            stream = self._queue.get()
            if stream is None:
                return
            with self._cond:
                self._cond.wait_for(lambda: not self._paused or not self._running)
            while (job := stream.next_job()) is not None:
                try:
                    stream.process(*job)
                    self._host.top_up()  # for the decode thread's next evictions, before drain returns
                except BaseException as err:  # noqa: BLE001 - reported to the caller on its next call
                    with self._cond:
                        self._errors.append(err)
                finally:
                    with self._cond:
                        self._backlog -= job[0]
                        self._cond.notify_all()
            with self._cond:  # the stream went idle: wake drain/fork waiting for exactly that
                self._cond.notify_all()

    def _raise_errors(self) -> None:
        if self._errors:
            raise RuntimeError(f"a CPU re-encode failed: {self._errors[0]!r}") from self._errors[0]

    def pause(self) -> None:
        """Hold the re-encoders before their next stream (appends keep going into temporary segments)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> None:
        """Run the deferred evictions, then wait until every queued re-encode has been swapped in and
        every freed request's host rows are back; raises if one failed."""
        self._run_due()
        with self._cond:
            if not self._cond.wait_for(
                lambda: (
                    self._errors
                    or (
                        self._backlog == 0
                        and not any(s.scheduled for streams in self._requests.values() for s in streams)
                        and not any(s.scheduled for s in self._freed_busy)
                    )
                ),
                timeout,
            ):
                raise TimeoutError(f"re-encoders still have {self._backlog} tokens after {timeout} s")
        self._raise_errors()

    def close(self) -> None:
        """Stop the CPU threads (queued work is dropped) and free every request."""
        for rid in list(self._requests):
            self.free(rid)
        with self._cond:
            self._running = False
            self._cond.notify_all()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    # ---- accounting -------------------------------------------------------------------------------
    def request_stats(self, request_id: str) -> dict[str, int]:
        """Real bytes of one request: pages it references, host buffers, dense device tensors."""
        streams = [self._stream(request_id, layer) for layer in range(self.n_layers)]
        parts = [st for s in streams for st in s.paged()]
        ids = [page_ids(st.pages) for st in parts]
        pages = len(np.unique(np.concatenate(ids))) if ids else 0  # a shared page once
        rows = _unique_rows(parts)
        return {
            "tokens": streams[0].snapshot.length,
            "segments": len(streams[0].snapshot.segments),
            "temp_tokens": sum(s.temp_tokens for s in streams),
            "page_bytes": pages * self.pool.page_bytes,
            "row_bytes": rows,
            "dense_bytes": sum(s.dense_bytes() for s in streams),
            "host_bytes": sum(s.host.nbytes for s in streams),
            "kv_bytes": pages * self.pool.page_bytes + sum(s.dense_bytes() for s in streams),
        }

    def stats(self) -> dict[str, int | float]:
        """Manager totals for the worker's ``stats`` (engine map) and /metrics; flat str -> number."""
        with self._lock:
            streams = [s for group in self._requests.values() for s in group]
            n_requests = len(self._requests)
            backlog, peak, stalls, stall_s = self._backlog, self._backlog_peak, self._stalls, self._stall_s
            errors, freed_reencodes = len(self._errors), self._reencodes_freed
            prefix_segments, prefix_hits = len(self._prefix), self._prefix_hits
        parts = [part for s in streams for part in s.paged()]
        used_pages = self.pool.used_pages
        page_bytes = used_pages * self.pool.page_bytes
        rows = _unique_rows(parts)
        return {
            "cache_requests": n_requests,
            "cache_page_bytes": page_bytes,
            "cache_page_reserved_bytes": self.pool.reserved_pages * self.pool.page_bytes,
            "cache_pages_used": used_pages,
            "cache_row_bytes": rows,
            "cache_fragmentation": 1.0 - rows / page_bytes if page_bytes else 0.0,
            "cache_dense_bytes": sum(s.dense_bytes() for s in streams),
            "cache_host_bytes": sum(s.host.nbytes for s in streams),
            "cache_host_reserved_bytes": self._host.nbytes,
            "cache_temp_tokens": sum(s.temp_tokens for s in streams),
            "cache_backlog_tokens": backlog,
            "cache_backlog_peak": peak,
            "cache_backlog_limit": self.config.max_backlog_tokens,
            "cache_backlog_stalls": stalls,
            "cache_backlog_stall_s": stall_s,
            "cache_reencodes": freed_reencodes + sum(s.reencodes for s in streams),
            "cache_reencode_s": sum(s.reencode_s for s in streams),
            "cache_threads": self.n_threads,
            "cache_errors": errors,
            "cache_prefix_segments": prefix_segments,
            "cache_prefix_hits": prefix_hits,
            "cache_steady_appends": self._steady_appends,
            "cache_steady_attends": self._steady_attends,
            "cache_deferred_evictions": self._deferred,
        }


def _check_method(method: CompressionMethod) -> None:
    if method.name != "mosaic":
        raise ValueError(
            f"the cache manager stores method 'mosaic' only, got {method.name!r}; "
            "dense and mask methods keep the core KVCache"
        )


def _unique_rows(parts: Iterable[Paged]) -> int:
    """Bytes of real data (rows, rotations, summaries), each shared part once (parts that share
    data share their first page)."""
    return sum({part.pages[0]: part.used_bytes for part in parts if part.pages}.values())


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` means the current CUDA device; tensors always carry its index, so compare with that."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
