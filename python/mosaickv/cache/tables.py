"""The kernels' view of the manager's snapshots: stripe and page tables over the pool's pages, so
decode attention reads packed rows, summaries and rotations where they live, without gathering
them (docs/CACHE.md, "Attention over the pages").

A closed segment's tables are built once and cached on it (it never changes); a temporary
segment's are rebuilt when a snapshot shows more of it. ``snapshot_layout`` joins the tables of a
batch of snapshots into one ``DecodeLayout`` per call: only the dense sinks and window are copied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from mosaickv.cache.dense_batch import DenseBatch, dense_batch
from mosaickv.cache.pages import PagedBlob, PagedStripe, PagePool
from mosaickv.cache.segments import PagedSegment, Snapshot
from mosaickv.cache.temp import TempView
from mosaickv.cache.upload import to_device
from mosaickv.core import CompressionMethod
from mosaickv.core.summaries import summary_width
from mosaickv.ops.layout import (
    STRIPE_COLS,
    SUMMARY_KIND_IDS,
    DecodeLayout,
    DecodeWorkspace,
    n_selects,
    stripe_row,
)

_COL = {name: i for i, name in enumerate(STRIPE_COLS)}
_PAGE_COLS = [_COL[c] for c in ("k_bits", "k_vals", "v_bits", "v_vals", "sum_pages", "rot_pages")]


@dataclass(frozen=True)
class SegmentTables:
    """One segment's stripe rows (one per KV head; page columns relative to ``pages``), its page
    addresses, and tensors those addresses point into that must outlive the layout (a temporary
    segment's summary tensor, which a later append may replace)."""

    rows: np.ndarray  # [H_kv, len(STRIPE_COLS)] int64; seq and block_off are set per batch
    pages: torch.Tensor  # int64 device addresses, on the pool's device
    keep_alive: tuple[torch.Tensor, ...] = ()


def _stripe_entries(stripe: PagedStripe, entries: list[np.ndarray]) -> tuple[int, int, int]:
    """Append a stripe's bitmap and value page addresses; returns (bits entry, vals entry, rows/page)."""
    addr = stripe.pool.addresses(stripe.pages)
    base = sum(len(e) for e in entries)
    entries += [addr, addr + stripe.values_offset]
    return base, base + len(addr), stripe.rows_per_page


def _blob_entries(blob: PagedBlob, row_bytes: int, entries: list[np.ndarray]) -> tuple[int, int]:
    """Append a blob's page addresses; returns (entry, rows per page) for rows of row_bytes, which
    divide the page (``pages_readable``)."""
    base = sum(len(e) for e in entries)
    entries.append(blob.pool.addresses(blob.pages))
    return base, blob.pool.page_bytes // row_bytes


def _rows(
    k: tuple[PagedStripe, ...],
    v: tuple[PagedStripe, ...],
    length: int,
    entries: list[np.ndarray],
    summary: tuple[int, int, int],
    rotation: tuple[int, int, int, int],
) -> np.ndarray:
    """One stripe row per head. summary: (entry, first row of head 0, rows/page) with one row
    per block; rotation: (entry, first R_K row of head 0, first R_V row of head 0, rows/page)."""
    n_blocks = -(-length // k[0].block)
    d = k[0].dim
    s_entry, s_first, s_rows = summary
    r_entry, r_k, r_v, r_rows = rotation
    rows = []
    for h, (sk, sv) in enumerate(zip(k, v, strict=True)):
        k_pages, v_pages = _stripe_entries(sk, entries), _stripe_entries(sv, entries)
        sums = (s_entry, s_first + h * n_blocks, s_rows)
        rots = (r_entry, r_k + h * d, r_v + h * d, r_rows)
        rows.append(
            stripe_row(0, h, length, (sk.keep, sv.keep), (sk.group, sv.group), k_pages, v_pages, sums, rots)
        )
    return np.array(rows, dtype=np.int64)


def pages_readable(m: CompressionMethod, dim: int, dtype: torch.dtype, pool: PagePool) -> bool:
    """Whether the kernels can attend a cache of method ``m`` over ``pool``'s pages: it selects
    blocks, and its summary rows (and D-float rotation rows) never straddle a page. Otherwise the
    manager hands the core reference a gathered copy (``DecodePlan``)."""
    if not m.selects_blocks:
        return False
    summary_row = summary_width(m.summary, dim, m.summary_channels) * dtype.itemsize
    return pool.page_bytes % summary_row == 0 and pool.page_bytes % (4 * dim) == 0


def closed_tables(seg: PagedSegment, width: int) -> SegmentTables:
    """A closed segment's tables (cached on it: it never changes). width: summary row elements."""
    if seg.table_cache:
        return seg.table_cache[0]
    if seg.summary_blob is None:
        raise ValueError("attention over the pages needs block summaries (token_ratio < 1)")
    entries: list[np.ndarray] = []
    elem = seg.summary_blob.dtype.itemsize
    s_entry, s_rows = _blob_entries(seg.summary_blob, width * elem, entries)
    d, n_heads = seg.k[0].dim, len(seg.k)
    r_entry, r_rows = _blob_entries(seg.rotations, 4 * d, entries)  # [2, H, D, D] float32
    rows = _rows(seg.k, seg.v, seg.length, entries, (s_entry, 0, s_rows), (r_entry, 0, n_heads * d, r_rows))
    device = seg.rotations.pool.device
    tables = SegmentTables(rows, to_device(np.concatenate(entries), device))
    seg.table_cache.append(tables)
    return tables


def temp_tables(view: TempView) -> SegmentTables:
    """The tables of a temporary segment's first ``view.length`` rows: its own device tables
    (``TempTables``, brought up to date here) with the view's row count."""
    tables = view.temp.tables
    tables.update()
    rows = tables.rows.copy()
    rows[:, _COL["tokens"]] = view.length
    return SegmentTables(rows, tables.pages, (view.temp.summary,))


def snapshot_layout(
    snaps: list[Snapshot],
    methods: list[CompressionMethod],
    pool: PagePool,
    gqa_group: int,
    reuse: DecodeWorkspace | None = None,
    dense: DenseBatch | None = None,
) -> tuple[DecodeLayout, DecodeWorkspace]:
    """One layer's DecodeLayout over a batch of snapshots (same H_kv, D, dtype, block size and
    summary kind), reading the pool's pages in place, and its workspace for ``gqa_group`` query
    heads per KV head (``reuse`` when it fits, ``DecodeWorkspace.sized``); the dense rows through
    ``dense`` (the caller's table of these snapshots' rows) or one made here (``dense_batch``). Host
    work and two small copies to the device: it never waits for the device."""
    m0 = methods[0]
    _, n_kv, _, d = snaps[0].dense.buf.shape
    if not pages_readable(m0, d, snaps[0].dense.buf.dtype, pool):
        raise ValueError(
            f"the kernels cannot read these pages: method {m0!r} attends every block or its summary rows "
            f"straddle pages of {pool.page_bytes} B; attend through the core reference (DecodePlan)"
        )
    kind = SUMMARY_KIND_IDS[m0.summary]
    width = summary_width(m0.summary, d, m0.summary_channels)
    per_seq: list[list[SegmentTables]] = []
    for snap, m in zip(snaps, methods, strict=True):
        if (m.block_size, summary_width(m.summary, d, m.summary_channels)) != (m0.block_size, width) or (
            SUMMARY_KIND_IDS[m.summary] != kind
        ):
            raise ValueError("a batch needs one block size and summary kind and width")
        tables = [closed_tables(seg, width) for seg in snap.segments]
        if snap.temp is not None and snap.temp.length:
            tables.append(temp_tables(snap.temp))
        per_seq.append(tables)
    flat = [t for tables in per_seq for t in tables]
    cols = len(STRIPE_COLS)
    rows = np.stack([t.rows for t in flat]) if flat else np.zeros((0, n_kv, cols), np.int64)  # a copy
    n_pages = np.array([t.pages.shape[0] for t in flat], dtype=np.int64)
    rows[:, :, _PAGE_COLS] += (np.cumsum(n_pages) - n_pages)[:, None, None]  # into the pages' concatenation
    counts = [len(tables) for tables in per_seq]
    rows[:, :, _COL["seq"]] = np.repeat(np.arange(len(snaps)), counts)[:, None]
    spans = zip(counts, np.cumsum(counts), strict=True)  # each sequence's tables, then (b, h), segment order
    table = np.concatenate([rows[e - c : e].transpose(1, 0, 2).reshape(-1, cols) for c, e in spans])
    blocks = -(-table[:, _COL["tokens"]] // m0.block_size)  # per stripe
    table[:, _COL["block_off"]] = np.cumsum(blocks) - blocks
    stripes_per_head = np.repeat(counts, n_kv)
    stripe_ptr = np.concatenate([[0], np.cumsum(stripes_per_head)])
    block_ptr = np.concatenate([[0], np.cumsum(blocks)])[stripe_ptr]
    ratios = np.repeat([m.token_ratio for m in methods], n_kv)
    head_blocks = np.diff(block_ptr)
    n_sel = n_selects(head_blocks, ratios)
    n_blocks = int(block_ptr[-1])
    pages = [t.pages for t in flat]
    keep = [x for t in flat for x in t.keep_alive]
    device = pool.device
    wide = to_device(np.concatenate([table.ravel(), blocks]), device)
    ints = np.concatenate([stripe_ptr, block_ptr, n_sel]).astype(np.int32)
    narrow = to_device(ints, device)
    bh = len(stripes_per_head)
    counts = wide[table.size :]
    layout = DecodeLayout(
        packed=True,
        stripes=wide[: table.size].view(table.shape),
        pages=torch.cat(pages) if pages else torch.zeros(1, dtype=torch.int64, device=device),
        stripe_ptr=narrow[: bh + 1],
        block_ptr=narrow[bh + 1 : 2 * bh + 2],
        block_stripe=torch.repeat_interleave(
            torch.arange(len(table), dtype=torch.int32, device=device), counts, output_size=n_blocks
        ),
        summary_kind=kind,
        summary_width=width,
        block=m0.block_size,
        n_select=narrow[2 * bh + 2 :],
        dense_k=torch.empty(0),
        dense_v=torch.empty(0),
        dense_len=torch.empty(0),
        kdense=torch.empty(0, d, dtype=snaps[0].dense.buf.dtype, device=device),
        vdense=torch.empty(0, d, dtype=snaps[0].dense.buf.dtype, device=device),
        owner=tuple(keep),
    )
    layout = with_dense(layout, snaps, dense if dense is not None else dense_batch([s.dense for s in snaps]))
    per_head = stripes_per_head.tolist()
    return layout, DecodeWorkspace.sized(layout, gqa_group, n_sel.tolist(), per_head, n_blocks, reuse=reuse)


def with_dense(layout: DecodeLayout, snaps: list[Snapshot], batch: DenseBatch | None) -> DecodeLayout:
    """``layout`` with the dense part (sinks, then the window) of ``snaps``: read where the rows are
    through ``batch`` (``dense_batch``: no copy), one sequence's buffer as it is, or, for buffers of
    several sizes (an append of several tokens outgrew one), stacked in one copy. The compressed
    part's tables stay valid while the snapshots' segments and temporary view are the same objects
    (``table_key``)."""
    if batch is not None:
        first = batch.bufs[0]
        shape = [len(batch.bufs), *first.shape[1:]]  # dense_k/v: only the rows' shape and dtype
        k, v = first[0].expand(shape), first[1].expand(shape)
        return replace(layout, dense_k=k, dense_v=v, dense_len=batch.lengths, dense_rows=batch.rows)
    bufs = [s.dense.buf for s in snaps]
    if len(bufs) == 1:
        both = bufs[0].unsqueeze(1)  # [2, 1, H_kv, cap, D]
    else:
        cap = max(b.shape[2] for b in bufs)
        both = bufs[0].new_zeros(2, len(bufs), bufs[0].shape[1], cap, bufs[0].shape[3])
        for b, s in enumerate(snaps):
            both[:, b, :, : s.dense.n] = s.dense.buf[:, :, : s.dense.n]
    lengths = dense_lengths(snaps, both.device)
    return replace(layout, dense_k=both[0], dense_v=both[1], dense_len=lengths, dense_rows=None)


def dense_lengths(snaps: list[Snapshot], device: torch.device) -> torch.Tensor:
    """The snapshots' dense row counts, [B] int32 on ``device``. One sequence's is a view of a
    device arange: no host-to-device copy on the decode step of a single sequence."""
    if len(snaps) == 1 and snaps[0].dense.n < _COUNTING:
        n = snaps[0].dense.n
        return _counting(device)[n : n + 1]
    return to_device(np.array([s.dense.n for s in snaps], dtype=np.int32), device)


_COUNTING = 4096  # longer than any dense part (sinks + window + evict_tokens)


@functools.cache
def _counting(device: torch.device) -> torch.Tensor:
    with torch.inference_mode():  # as the manager's tensors (it is read in and out of the mode)
        return torch.arange(_COUNTING, dtype=torch.int32, device=device)


def table_key(snaps: list[Snapshot]) -> tuple[object, ...]:
    """What the compressed part of a layout depends on: each snapshot's segments (a tuple that a
    swap replaces) and temporary view (replaced when tokens leave the window). Compare with ``is``."""
    return tuple(x for s in snaps for x in (s.segments, s.temp))
