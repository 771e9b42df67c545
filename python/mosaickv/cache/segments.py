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
class Snapshot:
    """One consistent state of a (request, layer) cache; attention reads exactly one snapshot.

    generation counts swaps (a re-encoded segment replacing temporary rows); appends make a new
    snapshot of the same generation. sink_*, window_*: [n, H_kv, D] storage dtype, never mutated.
    """

    generation: int
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    segments: tuple[PagedSegment, ...]
    temp: TempView | None
    window_k: torch.Tensor
    window_v: torch.Tensor

    @property
    def length(self) -> int:
        n = self.sink_k.shape[0] + sum(s.length for s in self.segments) + self.window_k.shape[0]
        return n + (self.temp.length if self.temp is not None else 0)

    def to_kvcache(self, method: CompressionMethod) -> KVCache:
        """A core KVCache over this snapshot (packed rows gathered from pages, nothing decompressed);
        pending tokens are all in the temporary segment, so the dense tail is exactly the window."""
        n_kv, dim = self.sink_k.shape[1], self.sink_k.shape[2]
        cache = KVCache(method, n_kv, dim, self.sink_k.dtype, self.sink_k.device, None)
        cache.sink_k, cache.sink_v = self.sink_k, self.sink_v
        cache.segments = [s.to_core() for s in self.segments]
        if self.temp is not None and self.temp.length:
            cache.segments.append(self.temp.to_core())
        cache.tail_k, cache.tail_v = self.window_k, self.window_v
        return cache
