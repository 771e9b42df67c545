"""The kernels' view of the manager's snapshots: stripe and page tables over the pool's pages, so
decode attention reads packed rows, summaries and rotations where they live, without gathering
them (docs/CACHE.md, "Attention over the pages").

A closed segment's tables are built once and cached on it (it never changes); a temporary
segment's are rebuilt when a snapshot shows more of it. ``snapshot_layout`` joins the tables of a
batch of snapshots into one ``DecodeLayout`` per call: only the dense sinks and window are copied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from mosaickv.cache.pages import PagedBlob, PagedStripe, PagePool
from mosaickv.cache.segments import PagedSegment, Snapshot
from mosaickv.cache.temp import TempView
from mosaickv.core import CompressionMethod
from mosaickv.core.summaries import summary_width
from mosaickv.ops.layout import STRIPE_COLS, SUMMARY_KIND_IDS, DecodeLayout, n_select, stripe_row

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
    tables = SegmentTables(rows, torch.from_numpy(np.concatenate(entries)).to(device))
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
    snaps: list[Snapshot], methods: list[CompressionMethod], pool: PagePool, device: torch.device
) -> DecodeLayout:
    """One layer's DecodeLayout over a batch of snapshots (same H_kv, D, dtype, block size and
    summary kind), reading the pool's pages in place."""
    m0 = methods[0]
    n_kv, d, dtype = snaps[0].sink_k.shape[1], snaps[0].sink_k.shape[2], snaps[0].sink_k.dtype
    if not pages_readable(m0, d, dtype, pool):
        raise ValueError(
            f"the kernels cannot read these pages: method {m0!r} attends every block or its summary rows "
            f"straddle pages of {pool.page_bytes} B; attend through the core reference (DecodePlan)"
        )
    kind = SUMMARY_KIND_IDS[m0.summary]
    width = summary_width(m0.summary, d, m0.summary_channels)
    rows, pages, keep = [], [], []
    stripe_ptr, block_ptr, n_sel, blocks_per_stripe = [0], [0], [], []
    n_entries = n_stripes = n_blocks = 0
    for b, (snap, m) in enumerate(zip(snaps, methods, strict=True)):
        if (m.block_size, summary_width(m.summary, d, m.summary_channels)) != (m0.block_size, width) or (
            SUMMARY_KIND_IDS[m.summary] != kind
        ):
            raise ValueError("a batch needs one block size and summary kind and width")
        tables = [closed_tables(seg, width) for seg in snap.segments]
        if snap.temp is not None and snap.temp.length:
            tables.append(temp_tables(snap.temp))
        per_head: list[list[np.ndarray]] = [[] for _ in range(n_kv)]
        for t in tables:
            r = t.rows.copy()
            r[:, _PAGE_COLS] += n_entries
            r[:, _COL["seq"]] = b
            n_entries += len(t.pages)
            pages.append(t.pages)
            keep += t.keep_alive
            for h in range(n_kv):
                per_head[h].append(r[h])
        for h in range(n_kv):
            nb_bh = 0
            for r in per_head[h]:
                nb = -(-int(r[_COL["tokens"]]) // m.block_size)
                r[_COL["block_off"]] = n_blocks
                blocks_per_stripe.append(nb)
                n_blocks += nb
                nb_bh += nb
                rows.append(r)
            n_stripes += len(per_head[h])
            stripe_ptr.append(n_stripes)
            block_ptr.append(n_blocks)
            n_sel.append(n_select(nb_bh, m.token_ratio))
    i32, i64 = torch.int32, torch.int64
    table = np.stack(rows) if rows else np.zeros((0, len(STRIPE_COLS)), dtype=np.int64)
    counts = torch.tensor(blocks_per_stripe, dtype=i64, device=device)
    layout = DecodeLayout(
        packed=True,
        stripes=torch.from_numpy(table).to(device),
        pages=torch.cat(pages) if pages else torch.zeros(1, dtype=i64, device=device),
        stripe_ptr=torch.tensor(stripe_ptr, dtype=i32, device=device),
        block_ptr=torch.tensor(block_ptr, dtype=i32, device=device),
        block_stripe=torch.repeat_interleave(
            torch.arange(len(rows), dtype=i32, device=device), counts, output_size=n_blocks
        ),
        summary_kind=kind,
        summary_width=width,
        block=m0.block_size,
        n_select=torch.tensor(n_sel, dtype=i32, device=device),
        dense_k=torch.empty(0),
        dense_v=torch.empty(0),
        dense_len=torch.empty(0),
        kdense=torch.empty(0, d, dtype=dtype, device=device),
        vdense=torch.empty(0, d, dtype=dtype, device=device),
        owner=tuple(keep),
    )
    return with_dense(layout, snaps)


def with_dense(layout: DecodeLayout, snaps: list[Snapshot]) -> DecodeLayout:
    """``layout`` with the dense part (sinks, then the window) of ``snaps``: the only rows copied
    per call. The compressed part's tables stay valid while the snapshots' segments and temporary
    view are the same objects (``table_key``)."""
    n_kv, d = snaps[0].sink_k.shape[1], snaps[0].sink_k.shape[2]
    lens = [s.sink_k.shape[0] + s.window_k.shape[0] for s in snaps]
    dk = torch.zeros(
        len(snaps), n_kv, max(1, *lens), d, dtype=snaps[0].sink_k.dtype, device=layout.stripes.device
    )
    dv = torch.zeros_like(dk)
    for b, s in enumerate(snaps):
        n_s = s.sink_k.shape[0]
        dk[b, :, :n_s], dv[b, :, :n_s] = s.sink_k.transpose(0, 1), s.sink_v.transpose(0, 1)
        dk[b, :, n_s : lens[b]], dv[b, :, n_s : lens[b]] = (
            s.window_k.transpose(0, 1),
            s.window_v.transpose(0, 1),
        )
    dense_len = torch.tensor(lens, dtype=torch.int32).to(dk.device, non_blocking=True)
    return replace(layout, dense_k=dk, dense_v=dv, dense_len=dense_len)


def table_key(snaps: list[Snapshot]) -> tuple[object, ...]:
    """What the compressed part of a layout depends on: each snapshot's segments (a tuple that a
    swap replaces) and temporary view (replaced when tokens leave the window). Compare with ``is``."""
    return tuple(x for s in snaps for x in (s.segments, s.temp))
