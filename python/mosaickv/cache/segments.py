"""Segments held in pages: closed (immutable, shareable) and temporary (append-only), and the
immutable per-step snapshot that attention reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from mosaickv.cache.pages import PagedStripe, PagePool
from mosaickv.core import CompressionMethod, KVCache, PackedSide, Segment, block_summaries, pack_topk


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


def _side(stripes: tuple[PagedStripe, ...], rotation: torch.Tensor, dim: int, n: int) -> PackedSide:
    read = [s.read(n) for s in stripes]
    return PackedSide(
        [v for v, _ in read], dim, [s.group for s in stripes], bitmaps=[b for _, b in read], rotation=rotation
    )


@dataclass(frozen=True)
class PagedSegment:
    """A closed segment in pages. Immutable once built, so requests may share it (fork).

    rot_k, rot_v: [H_kv, D, D] float32 on the cache device; summary: [H_kv, n_b, F] storage dtype.
    """

    start: int
    length: int
    k: tuple[PagedStripe, ...]
    v: tuple[PagedStripe, ...]
    rot_k: torch.Tensor
    rot_v: torch.Tensor
    summary: torch.Tensor | None
    summary_kind: str | None

    @classmethod
    def from_core(
        cls, seg: Segment, start: int, pool: PagePool, dtype: torch.dtype, block: int
    ) -> PagedSegment:
        """Page the packed rows of a core segment; rotations and summary move to the pool's device."""
        dev = pool.device
        k, v = (
            _stripes(pool, seg.k, dtype, block),
            _stripes(pool, seg.v, dtype, block),
        )  # both checked: rotated
        rot_k, rot_v = cast(torch.Tensor, seg.k.rotation), cast(torch.Tensor, seg.v.rotation)
        summary = None if seg.summary is None else seg.summary.to(dev)
        return cls(start, seg.length, k, v, rot_k.to(dev), rot_v.to(dev), summary, seg.summary_kind)

    def to_core(self) -> Segment:
        d = self.rot_k.shape[-1]
        return Segment(
            self.start,
            self.length,
            _side(self.k, self.rot_k, d, self.length),
            _side(self.v, self.rot_v, d, self.length),
            self.summary,
            self.summary_kind,
        )

    def stripes(self) -> tuple[PagedStripe, ...]:
        return self.k + self.v

    def shared(self) -> PagedSegment:
        return PagedSegment(
            self.start,
            self.length,
            tuple(s.shared() for s in self.k),
            tuple(s.shared() for s in self.v),
            self.rot_k,
            self.rot_v,
            self.summary,
            self.summary_kind,
        )

    @property
    def dense_bytes(self) -> int:
        """Bytes outside pages: rotations and summary."""
        parts = [self.rot_k, self.rot_v] + ([self.summary] if self.summary is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True)
class TempStrategy:
    """How decode tokens are packed into the temporary segment: the previous segment's strategy.

    rot_k, rot_v: [H_kv, D, D] float32; keep_*/group_*: per head; channels: truncation or None.
    Before any segment exists it is the lossless identity strategy (keep = D, g = 1).
    """

    rot_k: torch.Tensor
    rot_v: torch.Tensor
    keep_k: tuple[int, ...]
    keep_v: tuple[int, ...]
    group_k: tuple[int, ...]
    group_v: tuple[int, ...]
    channels: int | None

    @classmethod
    def identity(cls, n_heads: int, dim: int, device: torch.device) -> TempStrategy:
        eye = torch.eye(dim, device=device).expand(n_heads, dim, dim).contiguous()
        full, one = (dim,) * n_heads, (1,) * n_heads
        return cls(eye, eye, full, full, one, one, None)

    @classmethod
    def of(cls, seg: PagedSegment, channels: int | None) -> TempStrategy:
        return cls(
            seg.rot_k,
            seg.rot_v,
            tuple(s.keep for s in seg.k),
            tuple(s.keep for s in seg.v),
            tuple(s.group for s in seg.k),
            tuple(s.group for s in seg.v),
            channels,
        )


class TempSegment:
    """The segment that decode tokens are encoded into, on the decode path, with ``strategy``.

    Append-only: rows and finished block summaries are never rewritten, so a snapshot that saw
    ``n`` rows stays valid while more are appended. Only the partial last block's summary changes;
    each snapshot carries its own copy of it.
    """

    def __init__(
        self,
        method: CompressionMethod,
        start: int,
        strategy: TempStrategy,
        pool: PagePool,
        dtype: torch.dtype,
    ) -> None:
        self.method, self.start, self.strategy, self.dtype = method, start, strategy, dtype
        st, d = strategy, strategy.rot_k.shape[-1]
        b = method.block_size
        self.k = tuple(
            PagedStripe(pool, d, g, k, dtype, b) for k, g in zip(st.keep_k, st.group_k, strict=True)
        )
        self.v = tuple(
            PagedStripe(pool, d, g, k, dtype, b) for k, g in zip(st.keep_v, st.group_v, strict=True)
        )
        self.length = 0
        self._blocks: list[torch.Tensor] = []  # summaries of finished blocks, [H_kv, n, F] each
        self._open = torch.empty(len(self.k), 0, d, device=pool.device)  # rotated keys of the open block
        self._open_summary: torch.Tensor | None = None  # [H_kv, 1, F] of the open block

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack k, v: [t, H_kv, D] (on the pool's device) with the strategy and update summaries."""
        st = self.strategy
        k_rot = torch.einsum("shd,hed->hse", k.float(), st.rot_k)
        v_rot = torch.einsum("shd,hed->hse", v.float(), st.rot_v)
        for stripes, x, keep, group in (
            (self.k, k_rot, st.keep_k, st.group_k),
            (self.v, v_rot, st.keep_v, st.group_v),
        ):
            for h, stripe in enumerate(stripes):
                stripe.append(*pack_topk(x[h], keep[h], group[h], st.channels, self.dtype))
        self.length += k.shape[0]
        if not self.method.selects_blocks:
            return
        b = self.method.block_size
        rows = torch.cat([self._open, k_rot], dim=1)
        n_full = rows.shape[1] // b
        if n_full:
            self._blocks.append(self._summarise(rows[:, : n_full * b]))
        self._open = rows[:, n_full * b :]
        # a new tensor each time: snapshots keep the one they saw
        self._open_summary = self._summarise(self._open) if self._open.shape[1] else None

    def _summarise(self, x: torch.Tensor) -> torch.Tensor:
        m = self.method
        return block_summaries(x, m.block_size, m.summary, m.summary_channels, self.dtype)

    def view(self) -> TempView:
        """What a snapshot keeps: the row count and the summaries as of now."""
        blocks = list(self._blocks) + ([self._open_summary] if self._open_summary is not None else [])
        return TempView(self, self.length, tuple(blocks))

    def stripes(self) -> tuple[PagedStripe, ...]:
        return self.k + self.v

    def copy(self) -> TempSegment:
        """An independent copy (rows copied into new pages: both copies keep appending)."""
        twin = TempSegment(self.method, self.start, self.strategy, self.k[0].pool, self.dtype)
        for mine, theirs in zip(self.stripes(), twin.stripes(), strict=True):
            theirs.append(*mine.read())
        twin.length, twin._blocks = self.length, list(self._blocks)
        twin._open, twin._open_summary = self._open, self._open_summary
        return twin

    @property
    def dense_bytes(self) -> int:
        """Bytes outside pages owned by the temp alone: summaries and the open block's keys."""
        parts = self._blocks + [self._open]
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True)
class TempView:
    """A temporary segment as one snapshot saw it: its first ``length`` rows."""

    temp: TempSegment
    length: int
    summaries: tuple[torch.Tensor, ...]

    def to_core(self) -> Segment:
        t, st = self.temp, self.temp.strategy
        d = st.rot_k.shape[-1]
        summary = torch.cat(self.summaries, dim=1) if self.summaries else None
        return Segment(
            t.start,
            self.length,
            _side(t.k, st.rot_k, d, self.length),
            _side(t.v, st.rot_v, d, self.length),
            summary,
            t.method.summary if summary is not None else None,
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
