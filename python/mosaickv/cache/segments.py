"""Segments held in pages: closed (immutable, shareable) and temporary (append-only), and the
immutable per-step snapshot that attention reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch

from mosaickv.cache.pages import Paged, PagedBlob, PagedStripe, PagePool
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
            _side(self.k, rot_k, d, self.length),
            _side(self.v, rot_v, d, self.length),
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
        rot_k, rot_v = seg.rotations.read()
        return cls(
            rot_k,
            rot_v,
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
        # K and V heads side by side: one rotation and one top-k per strategy for the whole append
        self._rotations = torch.cat([st.rot_k, st.rot_v])  # [2 H_kv, D, D]
        self._packs = _heads_by_strategy(st.keep_k + st.keep_v, st.group_k + st.group_v, pool.device)
        self.length = 0
        self._blocks: list[torch.Tensor] = []  # summaries of finished blocks, [H_kv, n, F] each
        self._open = torch.empty(len(self.k), 0, d, device=pool.device)  # rotated keys of the open block
        self._open_summary: torch.Tensor | None = None  # [H_kv, 1, F] of the open block

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack k, v: [t, H_kv, D] (on the pool's device) with the strategy and update summaries."""
        t, d = k.shape[0], k.shape[2]
        rotated = torch.einsum("shd,hed->hse", torch.cat([k, v], dim=1).float(), self._rotations)
        stripes = self.k + self.v
        for keep, group, heads, index in self._packs:
            x = rotated if index is None else rotated.index_select(0, index)
            values, bitmap = pack_topk(x.reshape(-1, d), keep, group, self.strategy.channels, self.dtype)
            values, bitmap = values.view(len(heads), t, keep), bitmap.view(len(heads), t, bitmap.shape[-1])
            for i, h in enumerate(heads):
                stripes[h].append(values[i], bitmap[i])
        self.length += t
        if not self.method.selects_blocks:
            return
        b = self.method.block_size
        rows = torch.cat([self._open, rotated[: len(self.k)]], dim=1)  # rotated keys of the open block
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

    def paged(self) -> tuple[Paged, ...]:
        """Every part that owns pages."""
        return self.k + self.v

    def copy(self) -> TempSegment:
        """An independent copy (rows copied into new pages: both copies keep appending)."""
        twin = TempSegment(self.method, self.start, self.strategy, self.k[0].pool, self.dtype)
        for mine, theirs in zip(self.k + self.v, twin.k + twin.v, strict=True):
            theirs.append(*mine.read())
        twin.length, twin._blocks = self.length, list(self._blocks)
        twin._open, twin._open_summary = self._open, self._open_summary
        return twin

    @property
    def dense_bytes(self) -> int:
        """Bytes outside pages owned by the temp alone: summaries and the open block's keys."""
        parts = self._blocks + [self._open]
        return sum(t.numel() * t.element_size() for t in parts)


def _heads_by_strategy(
    keeps: tuple[int, ...], groups: tuple[int, ...], device: torch.device
) -> list[tuple[int, int, list[int], torch.Tensor | None]]:
    """(keep, g, heads, index) per distinct strategy; index selects those heads (None: all of them)."""
    by: dict[tuple[int, int], list[int]] = {}
    for h, key in enumerate(zip(keeps, groups, strict=True)):
        by.setdefault(key, []).append(h)
    return [
        (keep, g, heads, None if len(heads) == len(keeps) else torch.tensor(heads, device=device))
        for (keep, g), heads in by.items()
    ]


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
