"""Closed segments held in pages (immutable, shareable), and the immutable per-step snapshot that
attention reads (the temporary segment is in ``cache.temp``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from mosaickv.cache.pages import Paged, PagedBlob, PagedStripe, PagePool
from mosaickv.core import CompressionMethod, KVCache, PackedSide, Segment

if TYPE_CHECKING:  # the temp module imports this one
    from mosaickv.cache.temp import TempView


def _stripes(pool: PagePool, side: PackedSide, dtype: torch.dtype, block: int) -> tuple[PagedStripe, ...]:
    if side.bitmaps is None or side.rotation is None:
        raise ValueError(
            "the cache manager stores bitmap-layout segments (method 'mosaic'); "
            "got a segment without bitmaps or rotation"
        )
    out = []
    for h, vals in enumerate(side.values):
        stripe = PagedStripe(pool, side.dim, side.group[h], side.keep[h], dtype, block)
        stripe.append(vals, side.bitmaps[h])
        out.append(stripe)
    return tuple(out)


def side_of(stripes: tuple[PagedStripe, ...], rotation: torch.Tensor, dim: int, n: int) -> PackedSide:
    read = [s.read(n) for s in stripes]
    return PackedSide(
        [v for v, _ in read], dim, [s.group for s in stripes], bitmaps=[b for _, b in read], rotation=rotation
    )


@dataclass(frozen=True)
class PagedSegment:
    """A closed segment in pages: packed rows in stripes, its two rotations and block summary in
    blobs, so everything it holds per token is in the pool. Immutable once built, so requests may
    share it (fork, prefix sharing).

    rotations: [2, H_kv, D, D] float32 (K, V); summary: [H_kv, n_b, F] storage dtype.
    """

    start: int
    length: int
    k: tuple[PagedStripe, ...]
    v: tuple[PagedStripe, ...]
    rotations: PagedBlob
    summary_blob: PagedBlob | None
    summary_kind: str | None
    # the kernels' tables of this segment, built once by mosaickv.cache.tables (a cache, not state)
    table_cache: list = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def from_core(
        cls, seg: Segment, start: int, pool: PagePool, dtype: torch.dtype, block: int
    ) -> PagedSegment:
        """Page a core segment: its packed rows, rotations and summary."""
        k, v = _stripes(pool, seg.k, dtype, block), _stripes(pool, seg.v, dtype, block)  # both rotated
        rotations = PagedBlob(
            pool, torch.stack([cast(torch.Tensor, seg.k.rotation), cast(torch.Tensor, seg.v.rotation)])
        )
        summary = None if seg.summary is None else PagedBlob(pool, seg.summary)
        return cls(start, seg.length, k, v, rotations, summary, seg.summary_kind)

    def to_core(self) -> Segment:
        rot_k, rot_v = self.rotations.read()
        d = rot_k.shape[-1]
        return Segment(
            self.start,
            self.length,
            side_of(self.k, rot_k, d, self.length),
            side_of(self.v, rot_v, d, self.length),
            None if self.summary_blob is None else self.summary_blob.read(),
            self.summary_kind,
        )

    def paged(self) -> tuple[Paged, ...]:
        """Every part that owns pages."""
        return (
            self.k
            + self.v
            + (self.rotations,)
            + ((self.summary_blob,) if self.summary_blob is not None else ())
        )

    def shared(self) -> PagedSegment:
        return PagedSegment(
            self.start,
            self.length,
            tuple(s.shared() for s in self.k),
            tuple(s.shared() for s in self.v),
            self.rotations.shared(),
            self.summary_blob.shared() if self.summary_blob is not None else None,
            self.summary_kind,
        )


@dataclass(frozen=True)
class DenseRows:
    """The dense part of one (request, layer) cache, stored as the kernels read it: rows [0, n) of
    ``buf`` [2, H_kv, cap, D] (K then V, storage dtype), the first ``n_sink`` the sinks, the rest the
    recent window (unrotated, uncompressed).

    Each row of a buffer is written once: an append writes past the ``n`` of every view of it, an
    eviction or an append past ``cap`` starts a new buffer. So a snapshot's rows never change under
    it, and attention hands the buffer to the kernels as it is, without copying it per call.
    """

    buf: torch.Tensor
    n_sink: int
    n: int

    @classmethod
    def empty(cls, n_heads: int, dim: int, dtype: torch.dtype, device: torch.device, cap: int) -> DenseRows:
        return cls(torch.empty(2, n_heads, cap, dim, dtype=dtype, device=device), 0, 0)

    @classmethod
    def of(
        cls, sink_k: torch.Tensor, sink_v: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, cap: int
    ) -> DenseRows:
        """Sinks and a tail, [n, H_kv, D] each, in a buffer of at least ``cap`` rows."""
        n_s, n = sink_k.shape[0], sink_k.shape[0] + tail_k.shape[0]
        rows = cls.empty(sink_k.shape[1], sink_k.shape[2], sink_k.dtype, sink_k.device, max(cap, n))
        rows.buf[0, :, :n_s], rows.buf[1, :, :n_s] = sink_k.transpose(0, 1), sink_v.transpose(0, 1)
        rows.buf[0, :, n_s:n], rows.buf[1, :, n_s:n] = tail_k.transpose(0, 1), tail_v.transpose(0, 1)
        return cls(rows.buf, n_s, n)

    @property
    def cap(self) -> int:
        return self.buf.shape[2]

    @property
    def sink_k(self) -> torch.Tensor:
        """[n_sink, H_kv, D] (a view)."""
        return self.buf[0, :, : self.n_sink].transpose(0, 1)

    @property
    def sink_v(self) -> torch.Tensor:
        return self.buf[1, :, : self.n_sink].transpose(0, 1)

    @property
    def window_k(self) -> torch.Tensor:
        """[n - n_sink, H_kv, D] (a view)."""
        return self.buf[0, :, self.n_sink : self.n].transpose(0, 1)

    @property
    def window_v(self) -> torch.Tensor:
        return self.buf[1, :, self.n_sink : self.n].transpose(0, 1)

    def appended(self, k: torch.Tensor, v: torch.Tensor, new_sinks: int, cap: int) -> DenseRows:
        """These rows plus k, v: [t, H_kv, D], of which the first ``new_sinks`` become sinks (only
        while the window is empty); written in place past ``n``, or into a new buffer of at least
        ``cap`` rows when they do not fit."""
        t = k.shape[0]
        buf = self.buf
        if self.n + t > self.cap:
            _, h, _, d = buf.shape
            buf = DenseRows.empty(h, d, buf.dtype, buf.device, max(cap, self.n + t)).buf
            buf[:, :, : self.n] = self.buf[:, :, : self.n]
        buf[0, :, self.n : self.n + t] = k.transpose(0, 1)
        buf[1, :, self.n : self.n + t] = v.transpose(0, 1)
        return DenseRows(buf, self.n_sink + new_sinks, self.n + t)

    def oldest(self, out: int) -> torch.Tensor:
        """The ``out`` oldest window rows, K and V: [2, out, H_kv, D] (a contiguous copy)."""
        return self.buf[:, :, self.n_sink : self.n_sink + out].transpose(1, 2).contiguous()

    def without_oldest(self, out: int, cap: int) -> DenseRows:
        """The sinks and the window less its ``out`` oldest rows, in a new buffer of ``cap`` rows
        (at least what is left)."""
        left = self.n - out
        _, h, _, d = self.buf.shape
        rows = DenseRows.empty(h, d, self.buf.dtype, self.buf.device, max(cap, left))
        rows.buf[:, :, : self.n_sink] = self.buf[:, :, : self.n_sink]
        rows.buf[:, :, self.n_sink : left] = self.buf[:, :, self.n_sink + out : self.n]
        return DenseRows(rows.buf, self.n_sink, left)

    def copy(self) -> DenseRows:
        """The same rows in a buffer of their own (a fork appends to both)."""
        return DenseRows(self.buf.clone(), self.n_sink, self.n)


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of a (request, layer) cache; attention reads exactly one snapshot.

    generation counts swaps (a re-encoded segment replacing temporary rows); appends make a new
    snapshot of the same generation. dense: the sinks and the window (``DenseRows``).
    """

    generation: int
    dense: DenseRows
    segments: tuple[PagedSegment, ...]
    temp: TempView | None

    @property
    def length(self) -> int:
        n = self.dense.n + sum(s.length for s in self.segments)
        return n + (self.temp.length if self.temp is not None else 0)

    def to_kvcache(self, method: CompressionMethod) -> KVCache:
        """A core KVCache over this snapshot (packed rows gathered from pages, nothing decompressed);
        pending tokens are all in the temporary segment, so the dense tail is exactly the window."""
        d = self.dense
        _, n_kv, _, dim = d.buf.shape
        cache = KVCache(method, n_kv, dim, d.buf.dtype, d.buf.device, None)
        cache.sink_k, cache.sink_v = d.sink_k, d.sink_v
        cache.segments = [s.to_core() for s in self.segments]
        if self.temp is not None and self.temp.length:
            cache.segments.append(self.temp.to_core())
        cache.tail_k, cache.tail_v = d.window_k, d.window_v
        return cache
