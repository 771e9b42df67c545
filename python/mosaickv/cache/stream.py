"""One (request, layer) cache: the decode-side append, the CPU-side close and re-encode, and the
versioned swap between them (docs/CACHE.md, "Threading and the swap")."""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from mosaickv.cache.host import HostBuffer, HostChunks
from mosaickv.cache.pages import Paged, PagePool
from mosaickv.cache.segments import DenseRows, PagedSegment, Snapshot
from mosaickv.cache.temp import TempSegment, TempStrategy
from mosaickv.core import CompressionMethod, Segment

if TYPE_CHECKING:  # the manager module imports this one
    from mosaickv.cache.manager import CacheConfig


class Stream:
    """The cache of one request for one layer.

    Decode thread: ``append`` (window, temporary segment, host copy, one job for the CPU).
    CPU thread: ``process`` (the method's pending/close decisions in token order, re-encode, swap).
    Readers: ``acquire``/``release`` a Snapshot; pages retired by a swap are freed once no reader
    of an older generation remains.
    """

    def __init__(
        self,
        method: CompressionMethod,
        pool: PagePool,
        n_heads: int,
        dim: int,
        dtype: torch.dtype,
        config: CacheConfig,
        host: HostChunks,
        evict_phase: int = 0,
    ) -> None:
        self.method, self.pool, self.dtype = method, pool, dtype
        self.n_heads, self.dim = n_heads, dim
        self.config = config
        # the first eviction takes evict_tokens - phase tokens, later ones evict_tokens: streams given
        # different phases (the layers of a request) evict on different steps (``evicted``)
        self.evict_at = config.evict_tokens - evict_phase % config.evict_tokens
        self.lock = threading.Lock()
        # sinks + the longest window a one-token append leaves: every dense buffer of a batch has
        # this size, so one table describes them all (``dense_batch.DenseBatch``)
        self.dense_cap = method.n_sink + method.window + config.evict_tokens
        empty = DenseRows.empty(n_heads, dim, dtype, pool.device, self.dense_cap)
        self.snapshot = Snapshot(0, empty, (), None)
        self.temp: TempSegment | None = None
        self.host = HostBuffer(host)
        self.state: Any = None  # the method's per-cache state, owned by the CPU side
        self.jobs: deque[tuple[int, Any]] = deque()  # (tokens, CUDA event or None)
        self.scheduled = False
        self.cpu_pending = 0  # pending tokens the CPU has folded into the state
        self.readers: dict[int, int] = {}
        self.retired: list[tuple[int, tuple[Paged, ...]]] = []
        self.freed = False
        self.reencodes = 0
        self.reencode_s = 0.0

    # ---- prefill ----------------------------------------------------------------------------------
    def prefill(
        self, k: torch.Tensor, v: torch.Tensor, page: Callable[[Segment, int], PagedSegment] | None = None
    ) -> None:
        """Encode the prompt k, v: [T, H_kv, D] with the method, synchronously, into pages.

        ``page(segment, start)`` returns the paged form of each prompt segment (the manager's
        prefix cache may hand back a shared one); default: page it here.
        """
        if self.snapshot.length:
            raise ValueError("prefill must come first, on an empty (request, layer) cache")
        cache = self.method.encode(k, v)
        n_sink = cache.sink_k.shape[0]
        segs, start = [], n_sink
        for seg in cache.segments:
            if page is None:
                segs.append(PagedSegment.from_core(seg, start, self.pool, self.dtype, self.method.block_size))
            else:
                segs.append(page(seg, start))
            start += seg.length
        self.state = _to_host(cache.state)
        with self.lock:
            self.host.reset(start)
            dense = DenseRows.of(cache.sink_k, cache.sink_v, cache.tail_k, cache.tail_v, self.dense_cap)
            self.snapshot = Snapshot(0, dense, tuple(segs), None)
        if segs:  # made here, not by the first eviction: a step's decode path never builds one
            self.temp = self._new_temp(start)

    # ---- decode side ------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Add decode tokens k, v: [t, H_kv, D]; returns how many became pending (a CPU job)."""
        m = self.method
        with self.lock:
            snap = self.snapshot
            n_s = 0
            if snap.length == snap.dense.n_sink:
                n_s = min(m.n_sink - snap.dense.n_sink, k.shape[0])
                if n_s > 0:  # nothing is pending yet: the first pending token comes right after the sinks
                    self.host.reset(snap.dense.n_sink + n_s)
            dense = snap.dense.appended(k, v, n_s, self.dense_cap)
            self.snapshot = Snapshot(snap.generation, dense, snap.segments, snap.temp)
            return self._evict()

    def evict(self) -> int:
        """Move out the ``due_tokens`` (appends through the layer's ``DenseBatch`` write the row that
        makes an eviction due and leave it to the manager); returns how many became pending (a CPU job)."""
        with self.lock:
            return self._evict()

    def due_tokens(self) -> int:
        """Tokens an eviction is due for now (``evicted`` of the window as it is): 0 for none."""
        d = self.snapshot.dense
        return self.evicted(d.n - d.n_sink)

    def _evict(self) -> int:
        """The eviction of ``due_tokens``, if any: the oldest window rows go to the temporary segment
        (encoded on the device) and to the host copy (for the CPU job), the rest of the dense rows to
        a new buffer (caller holds the lock)."""
        snap = self.snapshot
        dense = snap.dense
        out = self.due_tokens()
        if not out:
            return 0
        self.evict_at = self.config.evict_tokens
        old_k, old_v = dense.oldest(out)
        if self.temp is None:
            self.temp = self._new_temp(self.host.end)
        self.temp.append(old_k, old_v)
        self.host.push(old_k, old_v)
        event = None
        if self.pool.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.jobs.append((out, event))
        rest = dense.without_oldest(out, self.dense_cap)
        self.snapshot = Snapshot(snap.generation, rest, snap.segments, self.temp.view())
        return out

    def window_row(self) -> DenseRows | None:
        """The dense rows whose row ``n`` a one-token append would only write (no sink to fill,
        nothing leaving the window, room in the buffer), for ``CacheManager.append_batch``, which
        writes it through the layer's ``DenseBatch`` and then calls ``set_rows``; None: ``append`` it."""
        return self.snapshot.dense if self.window_room() else None

    def window_room(self) -> int:
        """How many one-token appends in a row, from now, only write the next row of the dense buffer
        (``window_row``): none while sinks fill or an eviction is due; else until the window would
        evict (with ``config.defer_evictions``: up to the row that makes the eviction due) or the
        buffer is full."""
        snap = self.snapshot
        d = snap.dense
        if d.n_sink < self.method.n_sink and snap.length == d.n_sink:  # length: a sum, rarely
            return 0
        # row n leaves a window of n + 1 - n_sink rows, which evicts once its excess over
        # method.window reaches evict_at (``evicted``; evict_at >= 1, and dense_cap leaves room
        # for the row that makes it due)
        last = self.evict_at + self.method.window + d.n_sink - (0 if self.config.defer_evictions else 1)
        return max(0, min(d.cap, last) - d.n)

    def set_rows(self, buf: torch.Tensor, n: int) -> None:
        """Publish rows [0, n) of the dense buffer, written past the snapshot's rows by the layer's
        ``DenseBatch`` (swaps keep the dense rows, and only the decode thread appends, so ``buf`` is
        still the snapshot's)."""
        with self.lock:
            snap = self.snapshot
            if snap.dense.buf is not buf:
                raise RuntimeError("the dense rows were replaced under a batch that wrote them")
            grown = DenseRows(buf, snap.dense.n_sink, n)
            self.snapshot = Snapshot(snap.generation, grown, snap.segments, snap.temp)

    def evicted(self, window_len: int) -> int:
        """Tokens that leave a window grown to ``window_len``: all it holds past ``method.window``,
        once that is at least ``evict_at`` (``config.evict_tokens`` after the first eviction)."""
        excess = window_len - self.method.window
        return excess if excess >= self.evict_at else 0

    def _new_temp(self, start: int, after: PagedSegment | None = None) -> TempSegment:
        """An empty temporary segment from token ``start``, packing with the strategy of ``after``
        (default: the last closed segment; before any, the lossless identity)."""
        segs = self.snapshot.segments
        last = after if after is not None else (segs[-1] if segs else None)
        strategy = (
            TempStrategy.of(last, getattr(self.method, "channels", None))
            if last is not None
            else TempStrategy.identity(self.n_heads, self.dim, self.pool.device)
        )
        m, config = self.method, self.config
        return TempSegment(
            m, start, strategy, self.pool, self.dtype, config.append_kernel, config.evict_tokens
        )

    # ---- readers ----------------------------------------------------------------------------------
    def acquire(self) -> Snapshot:
        with self.lock:
            snap = self.snapshot
            self.readers[snap.generation] = self.readers.get(snap.generation, 0) + 1
            return snap

    def release(self, snap: Snapshot) -> None:
        with self.lock:
            left = self.readers[snap.generation] - 1
            if left:
                self.readers[snap.generation] = left
            else:
                del self.readers[snap.generation]
            self._reclaim()

    def _reclaim(self) -> None:
        """Free retired parts no live reader can see (caller holds the lock)."""
        oldest = min(self.readers, default=None)
        keep = []
        for gen, parts in self.retired:
            if oldest is not None and oldest <= gen:
                keep.append((gen, parts))
            else:
                for s in parts:
                    s.release()
        self.retired = keep

    # ---- CPU side ---------------------------------------------------------------------------------
    def next_job(self) -> tuple[int, Any] | None:
        """Pop the next job, or mark the stream idle and return None."""
        with self.lock:
            if self.jobs and not self.freed:
                return self.jobs.popleft()
            if self.freed:  # free() left the host rows to the re-encoder (before idle: drain reads that)
                self.host.reset(self.host.end)
            self.scheduled = False
            return None

    def process(self, n: int, event: Any) -> None:
        """Fold n newly pending tokens into the method's state in the sizes a synchronous
        ``KVCache.append`` uses (pending never passes segment_len unchecked), closing segments
        when the method says so."""
        if event is not None:
            event.synchronize()  # the device-to-host copy of these rows has landed
        m = self.method
        while n and not self.freed:  # free() drops the rest (a close of a freed stream publishes nothing)
            a = self.host.start + self.cpu_pending
            t = min(n, m.segment_len - self.cpu_pending)
            k, v = self.host.rows(a, a + t)  # pushed before the job was queued: no lock needed
            m._on_pending(self.state, k, v)
            self.cpu_pending += t
            n -= t
            if m._should_close(self.state, self.cpu_pending):
                self._close()

    def _close(self) -> None:
        """Encode the CPU's pending tokens as one segment and swap it in for the temporary rows."""
        began = time.perf_counter()
        if self.config.reencode_delay_s:
            time.sleep(self.config.reencode_delay_s)  # the configured slow re-encoder (backlog tests)
        a, n = self.host.start, self.cpu_pending
        k, v = self.host.rows(a, a + n)  # outside the lock: a copy when it spans chunks
        core = self.method._encode_segment(k, v, self.state, True)
        seg = PagedSegment.from_core(core, a, self.pool, self.dtype, self.method.block_size)
        temp = self._new_temp(a + n, seg)
        with self.lock:
            known = self.host.end
            hk, hv = self.host.rows(a + n, known)
        dev = self.pool.device
        temp.append(hk.to(dev), hv.to(dev))  # outside the lock: decode keeps appending meanwhile
        with self.lock:
            if self.freed:
                for s in seg.paged() + temp.paged():
                    s.release()
                return
            hk, hv = self.host.rows(known, self.host.end)
            temp.append(hk.to(dev), hv.to(dev))  # the few tokens that arrived during the encode
            snap = self.snapshot
            old = self.temp
            self.temp = temp
            self.snapshot = replace(
                snap, generation=snap.generation + 1, segments=snap.segments + (seg,), temp=temp.view()
            )
            if old is not None:
                self.retired.append((snap.generation, old.paged()))
            self.host.release_before(a + n)
            self.cpu_pending = 0
            self._reclaim()
            self.reencodes += 1
            self.reencode_s += time.perf_counter() - began
        if old is not None:
            old.check()  # an append kernel's status, read here off the decode path

    # ---- lifetime ---------------------------------------------------------------------------------
    def fork(self) -> Stream:
        """A copy for another request (the caller made sure no job is queued or running): closed
        segments share pages, the temporary segment and host rows are copied."""
        twin = Stream(self.method, self.pool, self.n_heads, self.dim, self.dtype, self.config, self.host.pool)
        with self.lock:
            snap = self.snapshot
            segs = tuple(s.shared() for s in snap.segments)
            twin.temp = self.temp.copy() if self.temp is not None else None
            twin.snapshot = replace(
                snap,
                generation=0,
                dense=snap.dense.copy(),
                segments=segs,
                temp=twin.temp.view() if twin.temp is not None else None,
            )
            k, v = self.host.rows(self.host.start, self.host.end)
            twin.host.reset(self.host.start)
            twin.host.push(k, v)
            twin.state = copy.deepcopy(self.state)
            twin.evict_at = self.evict_at
            twin.cpu_pending = self.cpu_pending
        return twin

    def free(self) -> int:
        """Drop everything; pages still read by a live snapshot go back when it is released.
        Returns the queued (never processed) pending tokens dropped."""
        with self.lock:
            self.freed = True
            dropped = sum(n for n, _ in self.jobs)
            self.jobs.clear()
            snap = self.snapshot
            owned = tuple(s for seg in snap.segments for s in seg.paged())
            owned += self.temp.paged() if self.temp is not None else ()
            self.retired.append((snap.generation, owned))
            self.temp = None
            self._reclaim()
            if not self.scheduled:  # else the re-encoder still reading them gives them back (next_job)
                self.host.reset(self.host.end)
            return dropped

    # ---- accounting -------------------------------------------------------------------------------
    def paged(self) -> list[Paged]:
        """Every paged part this stream owns now, retired ones included."""
        with self.lock:
            out = [s for seg in self.snapshot.segments for s in seg.paged()]
            out += list(self.temp.paged()) if self.temp is not None else []
            out += [s for _, group in self.retired for s in group]
            return out

    def dense_bytes(self) -> int:
        """Device bytes outside pages: sinks, window, the temporary segment's summaries and open block."""
        with self.lock:
            snap = self.snapshot
            n = snap.dense.buf.untyped_storage().nbytes()
            return n + (self.temp.dense_bytes if self.temp is not None else 0)

    @property
    def temp_tokens(self) -> int:
        t = self.snapshot.temp
        return t.length if t is not None else 0


def _to_host(state: Any) -> Any:
    """The method state moves to the host, where the CPU threads update it."""
    if state is None:
        return None
    moved = copy.copy(state)
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(moved, name, value.cpu())
    return moved
