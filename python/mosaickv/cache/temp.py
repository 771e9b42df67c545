"""The temporary segment: decode tokens that left the dense window, packed on the decode path with
the previous segment's strategy until the CPU re-encodes them into a closed segment.

On a GPU with the kernels built, an append is one ``append_encode`` launch for every head, K and
V, written straight into the segment's pages through its device page table (``TempTables``); the
torch path (CPU, or no kernels) packs with the core's ``pack_topk``. Both keep the block summaries
in one growing tensor, so attention reads them in place too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.cache.pages import Paged, PagedStripe, PagePool, grow_stripes, page_ids
from mosaickv.cache.segments import PagedSegment, side_of
from mosaickv.cache.upload import to_device
from mosaickv.core import CompressionMethod, Segment, block_summaries, pack_topk
from mosaickv.core.summaries import summary_width
from mosaickv.ops import STRIPE_COLS, append_encode, cuda_available
from mosaickv.ops.layout import SUMMARY_KIND_IDS, stripe_row


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
            rot_k.contiguous(),
            rot_v.contiguous(),
            tuple(s.keep for s in seg.k),
            tuple(s.keep for s in seg.v),
            tuple(s.group for s in seg.k),
            tuple(s.group for s in seg.v),
            channels,
        )


class TempSegment:
    """The segment that decode tokens are encoded into, on the decode path, with ``strategy``;
    ``kernel`` False keeps the torch path on a GPU. ``room``: tokens its summary holds before it
    first grows (an eviction's worth: an empty one, made at prefill, stays small).

    Append-only: rows and finished block summaries are never rewritten, so a snapshot that saw
    ``n`` rows stays valid while more are appended. Only the open (last, partial) block's summary
    row changes in place; each view keeps its own copy of it for the core reference path.
    """

    def __init__(
        self,
        method: CompressionMethod,
        start: int,
        strategy: TempStrategy,
        pool: PagePool,
        dtype: torch.dtype,
        kernel: bool = True,
        room: int = 128,
    ) -> None:
        self.method, self.start, self.strategy, self.dtype = method, start, strategy, dtype
        st, d = strategy, strategy.rot_k.shape[-1]
        b, h = method.block_size, len(strategy.keep_k)
        self.k = tuple(
            PagedStripe(pool, d, g, k, dtype, b) for k, g in zip(st.keep_k, st.group_k, strict=True)
        )
        self.v = tuple(
            PagedStripe(pool, d, g, k, dtype, b) for k, g in zip(st.keep_v, st.group_v, strict=True)
        )
        self.length = 0
        self.width = summary_width(method.summary, d, method.summary_channels) if method.selects_blocks else 0
        # block summaries [H_kv, capacity, F]: rows of finished blocks, then the open block's row
        self.summary = torch.zeros(h, -(-room // b), self.width, dtype=dtype, device=pool.device)
        self.kernel = kernel and pool.device.type == "cuda" and cuda_available()
        if self.kernel:
            mean = self.width and SUMMARY_KIND_IDS[method.summary] == 0
            self._block_sum = torch.zeros(h, self.width, device=pool.device) if mean else None
            self._status = torch.zeros(1, dtype=torch.int32, device=pool.device)
        else:
            # K and V heads side by side: one rotation and one top-k per strategy for the whole append
            self._rotations = torch.cat([st.rot_k, st.rot_v])  # [2 H_kv, D, D]
            self._packs = _heads_by_strategy(st.keep_k + st.keep_v, st.group_k + st.group_v, pool.device)
            self._open = torch.empty(h, 0, d, device=pool.device)  # rotated keys of the open block
        self._tables: TempTables | None = None
        if self.kernel:  # made here (prefill, a re-encoder's close), not by a decode step's first eviction
            self._tables = TempTables(self)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack k, v: [t, H_kv, D] (on the pool's device) with the strategy and update summaries."""
        t, b = k.shape[0], self.method.block_size
        if not t:
            return
        if self.width:
            self._reserve_blocks(-(-(self.length + t) // b))
        if self.kernel:
            self._append_kernel(k, v)
        else:
            self._append_torch(k, v)
        self.length += t

    @property
    def tables(self) -> TempTables:
        """The kernels' tables: made with the segment on the kernel path, on first use otherwise (the
        CPU path's appends never need them; a test may read them)."""
        if self._tables is None:
            self._tables = TempTables(self)
        return self._tables

    def _append_kernel(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t, n_heads, d = k.shape
        grow_stripes(self.k + self.v, t)
        self.tables.update()
        rows = torch.tensor(
            [[h, h * d, n_heads * d, t, self.length] for h in range(n_heads)], dtype=torch.int64
        )
        m = self.method
        append_encode(
            k.contiguous(),
            v.contiguous(),
            to_device(rows, k.device),
            self.tables.stripes,
            self.tables.pages,
            self._block_sum,
            SUMMARY_KIND_IDS[m.summary],
            self.width,
            d,
            self.strategy.channels or d,
            m.block_size,
            self._status,
            t,  # every row appends t tokens: an eviction's rows are split over several CTAs each
        )

    def _append_torch(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t, d = k.shape[0], k.shape[2]
        rotated = torch.einsum("shd,hed->hse", torch.cat([k, v], dim=1).float(), self._rotations)
        stripes = self.k + self.v
        for keep, group, heads, index in self._packs:
            x = rotated if index is None else rotated.index_select(0, index)
            values, bitmap = pack_topk(x.reshape(-1, d), keep, group, self.strategy.channels, self.dtype)
            values, bitmap = values.view(len(heads), t, keep), bitmap.view(len(heads), t, bitmap.shape[-1])
            for i, h in enumerate(heads):
                stripes[h].append(values[i], bitmap[i])
        if not self.width:
            return
        m, b = self.method, self.method.block_size
        rows = torch.cat([self._open, rotated[: len(self.k)]], dim=1)  # rotated keys of the open block
        first = self.length // b
        if rows.shape[1]:
            written = block_summaries(rows, b, m.summary, m.summary_channels, self.dtype)
            self.summary[:, first : first + written.shape[1]] = written
        self._open = rows[:, rows.shape[1] // b * b :]

    def _reserve_blocks(self, n: int) -> None:
        """Room for n block summaries: a larger tensor (the old one stays valid for its readers)."""
        if n > self.summary.shape[1]:
            grown = self.summary.new_zeros(
                self.summary.shape[0], max(n, 2 * self.summary.shape[1]), self.width
            )
            grown[:, : self.summary.shape[1]] = self.summary
            self.summary = grown

    def check(self) -> None:
        """Raise if an append launch reported a problem (reads a device flag: call off the hot path)."""
        if self.kernel and int(self._status.item()):
            raise RuntimeError(f"append_encode status {int(self._status.item())} (mosaickv/params.h Status)")

    def view(self) -> TempView:
        """What a snapshot keeps: the row count, the summary tensor and a copy of the open block's row."""
        b = self.method.block_size
        n_full = self.length // b
        open_row = self.summary[:, n_full : n_full + 1].clone() if self.width and self.length % b else None
        return TempView(self, self.length, self.summary, n_full, open_row)

    def paged(self) -> tuple[Paged, ...]:
        """Every part that owns pages."""
        return self.k + self.v

    def copy(self) -> TempSegment:
        """An independent copy (rows copied into new pages: both copies keep appending)."""
        twin = TempSegment(self.method, self.start, self.strategy, self.k[0].pool, self.dtype, self.kernel)
        for mine, theirs in zip(self.k + self.v, twin.k + twin.v, strict=True):
            theirs.append(*mine.read())
        twin.length, twin.summary = self.length, self.summary.clone()
        if self.kernel:
            twin._block_sum = None if self._block_sum is None else self._block_sum.clone()
            twin._tables = TempTables(twin)  # of its pages and summary now: not by its first eviction
        else:
            twin._open = self._open
        return twin

    @property
    def dense_bytes(self) -> int:
        """Bytes outside pages owned by the temp alone: summaries, running sums, the open block's keys."""
        parts = [self.summary] + ([self._tables.pages, self._tables.stripes] if self._tables else [])
        parts += [self._block_sum] if self.kernel and self._block_sum is not None else []
        parts += [] if self.kernel else [self._open]
        return sum(t.numel() * t.element_size() for t in parts)


class TempTables:
    """The kernels' stripe and page tables of one temporary segment on its device, kept current as
    its stripes grow: entry 0 is the summary tensor, 1 and 2 the strategy's R_K and R_V, then a
    region of ``per`` entries for each head's K bitmaps, K values, V bitmaps and V values (one per
    page). Pages never move, so known entries never change; a region that fills up is doubled
    into new tensors (older layouts keep theirs)."""

    def __init__(self, temp: TempSegment) -> None:
        self.temp = temp
        self.per = 16
        self._stripes = [s for pair in zip(temp.k, temp.v, strict=True) for s in pair]  # K0, V0, K1, ...
        self._build()

    def _region(self, h: int, side: int) -> int:
        return 3 + (4 * h + 2 * side) * self.per  # bitmaps; values follow at + per

    def _build(self) -> None:
        while max(len(s.pages) for s in self._stripes) > self.per:  # a fresh table of stripes that
            self.per *= 2  # already grew (a temporary segment re-packed after a close) or outgrew one
        t, dev = self.temp, self.temp.summary.device
        st = t.strategy
        pages = np.zeros(3 + 4 * len(t.k) * self.per, dtype=np.int64)
        pages[:3] = [t.summary.data_ptr(), st.rot_k.data_ptr(), st.rot_v.data_ptr()]
        self._known = [0] * len(self._stripes)  # pages of each stripe already in the table
        index, value = self._new_entries([len(s.pages) for s in self._stripes])
        pages[index] = value
        self.pages = to_device(pages, dev)
        self._summary_ptr = t.summary.data_ptr()
        self._set_rows()

    def _set_rows(self) -> None:
        """The stripe rows (host ``rows`` and device ``stripes``): their summary offsets follow the
        summary tensor's capacity, their token capacity ``per``."""
        t = self.temp
        n_heads, d, cap = len(t.k), t.strategy.rot_k.shape[-1], t.summary.shape[1]
        rows = np.zeros((n_heads, len(STRIPE_COLS)), dtype=np.int64)
        for h, (sk, sv) in enumerate(zip(t.k, t.v, strict=True)):
            kb, vb = self._region(h, 0), self._region(h, 1)
            tokens = self.per * min(sk.rows_per_page, sv.rows_per_page)  # the append kernel's capacity
            k_pages = (kb, kb + self.per, sk.rows_per_page)
            v_pages = (vb, vb + self.per, sv.rows_per_page)
            sums, rots = (0, h * cap, n_heads * cap), (1, h * d, n_heads * d + h * d, n_heads * d)
            keep, group = (sk.keep, sv.keep), (sk.group, sv.group)
            rows[h] = stripe_row(0, h, tokens, keep, group, k_pages, v_pages, sums, rots)
        self.rows = rows
        self.stripes = to_device(rows, t.summary.device)
        self._summary_cap = cap

    def update(self) -> None:
        """Write the entries of pages added since the last call (and a moved summary tensor): before
        the append kernel writes through the table, and before attention reads it (``tables``), so
        the CPU path, whose appends write with torch, never pays for it."""
        counts = [len(s.pages) for s in self._stripes]
        if counts != self._known or self.temp.summary.data_ptr() != self._summary_ptr:
            self._write(counts)  # else (most calls): no page added, the summary tensor did not move

    @torch.inference_mode()  # the tables are inference tensors (the manager makes everything in it)
    def _write(self, counts: list[int]) -> None:
        t = self.temp
        if max(counts) > self.per:  # a region is full: new, doubled tables
            self._build()
            return
        index, value = self._new_entries(counts)
        if t.summary.data_ptr() != self._summary_ptr:  # grown into a new tensor (``_reserve_blocks``)
            index, value = np.append(index, 0), np.append(value, t.summary.data_ptr())
            self._summary_ptr = t.summary.data_ptr()
            if t.summary.shape[1] != self._summary_cap:
                self._set_rows()
        if len(index):
            upload = to_device(np.stack([index, value]), self.pages.device)
            self.pages.index_copy_(0, upload[0], upload[1])

    def _new_entries(self, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(entry, address) of every page past the known ones of each stripe (``counts`` pages now),
        bitmap and values entries, from one address lookup; they become known."""
        stripes = self._stripes
        grown = [i for i, n in enumerate(counts) if n > self._known[i]]
        if not grown:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        new = [page_ids(stripes[i].pages)[self._known[i] : counts[i]] for i in grown]
        ends = np.cumsum([len(x) for x in new])[:-1]
        addrs = np.split(stripes[0].pool.addresses(np.concatenate(new)), ends)
        index, value = [], []
        for i, addr in zip(grown, addrs, strict=True):
            at = self._region(i // 2, i % 2) + self._known[i]
            index += [np.arange(at, at + len(addr)), np.arange(at + self.per, at + self.per + len(addr))]
            value += [addr, addr + stripes[i].values_offset]
            self._known[i] = counts[i]
        return np.concatenate(index), np.concatenate(value)


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
    """A temporary segment as one snapshot saw it: its first ``length`` rows, the summary tensor of
    that moment (its first ``n_full`` rows never change) and a copy of the open block's row."""

    temp: TempSegment
    length: int
    summary: torch.Tensor
    n_full: int
    open_row: torch.Tensor | None

    def to_core(self) -> Segment:
        t, st = self.temp, self.temp.strategy
        d = st.rot_k.shape[-1]
        summary = None
        if t.width:
            parts = [self.summary[:, : self.n_full]] + ([self.open_row] if self.open_row is not None else [])
            summary = torch.cat(parts, dim=1)
        return Segment(
            t.start,
            self.length,
            side_of(t.k, st.rot_k, d, self.length),
            side_of(t.v, st.rot_v, d, self.length),
            summary,
            t.method.summary if summary is not None else None,
        )
