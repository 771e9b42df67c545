"""The GPU layout of one layer's compressed caches for a batch of sequences, and the decode
workspace: what the CUDA kernels read (docs/KERNELS.md "GPU layout").

The kernels read every array through a page table of device addresses (``pages``), so the same
stripe table describes flat pools (one page per stripe array) and the cache manager's pages
(``mosaickv.cache``). ``DecodeLayout.from_caches`` flattens ``mosaickv.core`` caches (mosaic: packed
+ rotated; quest: dense) into flat pools; benchmarks may build a ``DecodeLayout`` directly on the GPU.
``DecodeWorkspace.plan`` sizes every buffer once (plan once, run many): the run path allocates
nothing and never synchronises with the host, so a CUDA graph can capture it.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.core import KVCache, bitmap_words

# What every stripe row starts with: the sequence, the KV head, the tokens, keep and g per side.
_STRIPE_SHAPE = ("seq", "head", "tokens", "keep_k", "keep_v", "group_k", "group_v")
# Column order of the stripe table; must match StripeCol in cuda/mosaickv/params.h. *_bits, *_vals,
# sum_pages and rot_pages are entries of the page table; *_rows are rows per page; sum_first and
# rot_first_* the first row of the stripe's summaries and rotations in their pages.
STRIPE_COLS = (
    *_STRIPE_SHAPE,
    *("k_bits", "k_vals", "k_rows", "v_bits", "v_vals", "v_rows"),
    *("sum_pages", "sum_first", "sum_rows", "rot_pages", "rot_first_k", "rot_first_v", "rot_rows"),
    "block_off",
    "row_off",
)
# A flat pool's stripe row (what the builders below write, and the torch references read): element
# offsets into the pools of DecodeLayout / AppendPools. ``paged_tables`` turns them into STRIPE_COLS.
FLAT_COLS = (*_STRIPE_SHAPE, "kbit_off", "vbit_off", "kval_off", "vval_off", "block_off", "row_off")
FLAT_ROWS = 1 << 30  # rows per page of a flat pool: every row is in the stripe's one page
SUMMARY_KIND_IDS = {"mean": 0, "compact": 0, "minmax": 1, "compact_minmax": 1}
# Column order of an append table (one row = new tokens of one stripe); must match AppendCol in
# cuda/mosaickv/params.h. The tokens' vectors are x[x_off + j * x_stride : ... + D] for j < tokens
# (x_k and x_v at the same offsets); they become the stripe's tokens pos .. pos + tokens - 1.
APPEND_COLS = ("stripe", "x_off", "x_stride", "tokens", "pos")
# Selected blocks per attention piece (one CTA): kMaxPieceBlocks in cuda/mosaickv/params.h is the most.
# Pieces of 64 blocks unless there are enough of them to fill the GPU many times over: then each CTA's
# fixed start and end cost counts more than the last wave's idle SMs, and pieces of 128 are faster
# (H200, 1M tokens: batch 8 -4 %, batch 1 +1 %, 128K batch 1 +15 %: bench/results/kernels-notes.md,
# "Thirteenth session").
# With less work, pieces of 64 are halved: to 32 while that still makes at most one wave of CTAs, and
# to 16 while there would be fewer CTAs than SMs (short contexts at batch 1). The attention then runs
# more CTAs side by side, each shorter; below 32 the merge's extra partials cost more than that gains
# unless SMs sit idle. H200, whole call with pieces of 64 / 32 / 16: 32K batch 1 46.4 / 42.4 / 40.7 µs,
# 64K batch 1 44.5 / 41.4 / 42.6, 128K batch 1 52.2 / 50.7 / 55.3, 32K batch 4 55.1 / 48.3, 64K batch
# 2 52.8 / 49.6; 256K batch 1 (two waves at 32) 73.4 / 74.6 (kernels-notes.md, "Sixteenth session").
MAX_PIECE_BLOCKS = 128
PIECE_BLOCKS = 64
WAVE_PIECE_BLOCKS = 32
MIN_PIECE_BLOCKS = 16
LARGE_PIECE_WAVES = 8  # waves of attention CTAs above which pieces of 128 pay
ATTENTION_CTAS_PER_SM = 4  # the attention's occupancy (__launch_bounds__(kPaThreads, 4))


def round_up8(k: int) -> int:
    """Row stride of a packed values row: keep rounded up to 8 elements (16-byte loads)."""
    return (k + 7) // 8 * 8


def n_select(n_blocks: int, ratio: float) -> int:
    """Blocks attended out of n_blocks; same rounding as mosaickv.core.summaries.select_top_blocks."""
    return int(n_selects(np.array([n_blocks]), np.array([ratio]))[0])


def n_selects(n_blocks: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """``n_select`` elementwise over arrays of block counts and ratios (int64)."""
    return np.minimum(n_blocks, np.ceil(ratios * n_blocks - 1e-9)).astype(np.int64)


def stripe_row(
    seq: int,
    head: int,
    tokens: int,
    keep: tuple[int, int],
    group: tuple[int, int],
    k_pages: tuple[int, int, int],
    v_pages: tuple[int, int, int],
    summary: tuple[int, int, int],
    rotation: tuple[int, int, int, int],
    block_off: int = 0,
    row_off: int = 0,
) -> list[int]:
    """One row of the stripe table (STRIPE_COLS). keep, group: (K, V); k_pages, v_pages: (bitmap
    entry, values entry, rows per page); summary: (entry, first row, rows per page); rotation:
    (entry, first R_K row, first R_V row, rows per page)."""
    return [seq, head, tokens, *keep, *group, *k_pages, *v_pages, *summary, *rotation, block_off, row_off]


def paged_tables(pools: "FlatPools") -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-pool stripe rows (``pools.rows``, FLAT_COLS) -> the kernels' stripe table (STRIPE_COLS)
    and page table.

    Every stripe array becomes one page (its address in the pool, FLAT_ROWS rows per page);
    summaries and rotations are one page each for all stripes (rot [n, 2, D, D]: stripe s's R_K
    starts at row 2 D s). The tables live on the pools' device; the pools must outlive them.
    """
    d = pools.rot.shape[-1] if pools.rot is not None else 0

    def addr(t: torch.Tensor | None, off: int = 0) -> int:
        return 0 if t is None else t.data_ptr() + off * t.element_size()

    pages = [addr(pools.summary), addr(pools.rot)]
    rows = []
    for s, (b, h, tok, kk, kv, gk, gv, kbo, vbo, kvo, vvo, blk, row) in enumerate(pools.rows.tolist()):
        e = len(pages)
        pages += [
            addr(pools.kbits, kbo),
            addr(pools.kvals, kvo),
            addr(pools.vbits, vbo),
            addr(pools.vvals, vvo),
        ]
        k_pages, v_pages = (e, e + 1, FLAT_ROWS), (e + 2, e + 3, FLAT_ROWS)
        rotation = (1, 2 * d * s, 2 * d * s + d, FLAT_ROWS)
        rows.append(
            stripe_row(
                b, h, tok, (kk, kv), (gk, gv), k_pages, v_pages, (0, blk, FLAT_ROWS), rotation, blk, row
            )
        )
    dev = pools.kbits.device
    stripes = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(STRIPE_COLS)).to(dev)
    return stripes, torch.tensor(pages, dtype=torch.int64).to(dev)


def random_bitmaps(rows: int, head_dim: int, keep: int, device: torch.device | str) -> torch.Tensor:
    """[rows * head_dim / 32] int32 (uint32 bit patterns): each row a g = 1 bitmap of ``head_dim``
    bits with exactly ``keep`` random bits set (head_dim a multiple of 32)."""
    n_words = head_dim // 32
    out = torch.empty(rows, n_words, dtype=torch.int32, device=device)
    shifts = torch.arange(32, device=device, dtype=torch.int64)
    for lo in range(0, rows, 1 << 21):  # bounded temporaries at 1M-token contexts
        n = min(1 << 21, rows - lo)
        idx = torch.rand(n, head_dim, device=device).topk(keep, dim=1).indices
        mask = torch.zeros(n, head_dim, dtype=torch.int64, device=device).scatter_(1, idx, 1)
        words = (mask.view(n, n_words, 32) << shifts).sum(-1)
        out[lo : lo + n] = (words - (words >= 2**31).long() * 2**32).to(torch.int32)
    return out.view(-1)


@dataclass
class FlatPools:
    """Flat pools that a layout's pages point into (``DecodeLayout.synthetic``/``from_caches``).

    Attributes:
        rows: [n_stripes, 13] int64, columns FLAT_COLS (element offsets into the pools).
        rot: [n_stripes, 2, D, D] float32 (R_K, R_V), or None (dense).
        kbits, vbits: flat int32 bitmap pools (uint32 bit patterns); empty when dense.
        kvals, vvals: flat storage-dtype value pools (packed) or [n_rows, D] rows (dense).
        summary: [n_blocks, width] storage dtype, or None (no summaries).
    """

    rows: torch.Tensor
    rot: torch.Tensor | None
    kbits: torch.Tensor
    vbits: torch.Tensor
    kvals: torch.Tensor
    vvals: torch.Tensor
    summary: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.rows, self.kbits, self.vbits, self.kvals, self.vvals]
        return out + [t for t in (self.summary, self.rot) if t is not None]


@dataclass
class DecodeLayout:
    """One layer, a batch of B sequences with H_kv KV heads of dim D.

    Attributes:
        packed: True for MosaicKV stripes (bitmaps + values + rotations), False for dense rows.
        stripes: [n_stripes, len(STRIPE_COLS)] int64, ordered by (b, h) then segment.
        pages: [n_entries] int64 device addresses that the stripe table's page columns index.
        stripe_ptr, block_ptr: [B*H_kv + 1] int32 CSR offsets of each (b, h)'s stripes and blocks.
        block_stripe: [n_blocks] int32 owning stripe of each block.
        summary_kind: 0 mean/compact, 1 minmax; summary_width: storage elements per summary row.
        n_select: [B*H_kv] int32 blocks attended per (b, h).
        dense_k, dense_v: [B, H_kv, cap, D] sinks then tail (pending + window); dense_len: [B] int32.
        dense_rows: None, or [2, B] int64 device addresses of each sequence's own K and V rows
            [H_kv, cap, D] (the cache manager's buffers: no stacked copy per call); dense_k/v then
            give only their shape and dtype (``tables.with_dense``).
        kdense, vdense: [n_rows, D] rows of the dense token-selection baseline (row_off), else empty.
        flat: the flat pools the pages point into, or None when the pages belong to their owner (the
            cache manager's page pool: ``owner`` keeps the snapshots read alive).
    """

    packed: bool
    stripes: torch.Tensor
    pages: torch.Tensor
    stripe_ptr: torch.Tensor
    block_ptr: torch.Tensor
    block_stripe: torch.Tensor
    summary_kind: int
    summary_width: int
    block: int
    n_select: torch.Tensor
    dense_k: torch.Tensor
    dense_v: torch.Tensor
    dense_len: torch.Tensor
    kdense: torch.Tensor
    vdense: torch.Tensor
    flat: FlatPools | None = None
    owner: object = None
    dense_rows: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.dense_k.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.dense_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.dense_k.shape[3]

    def nbytes(self) -> int:
        """Bytes of every tensor the layout owns (tables, dense part, flat pools if any)."""
        ts = [self.stripes, self.pages, self.stripe_ptr, self.block_ptr, self.block_stripe, self.n_select]
        # with dense_rows, the rows are the caller's buffers, not the layout's
        dense = [self.dense_k, self.dense_v] if self.dense_rows is None else [self.dense_rows]
        ts += [*dense, self.dense_len, self.kdense, self.vdense]
        ts += self.flat.tensors() if self.flat is not None else []
        return sum(t.numel() * t.element_size() for t in ts)

    @classmethod
    def from_flat(
        cls,
        flat: FlatPools,
        *,
        packed: bool,
        stripe_ptr: list[int],
        block_ptr: list[int],
        block_stripe: list[int],
        n_select: list[int],
        summary_kind: int,
        block: int,
        dense_k: torch.Tensor,
        dense_v: torch.Tensor,
        dense_len: torch.Tensor,
    ) -> "DecodeLayout":
        """A layout over flat pools: page tables from ``paged_tables``, CSR tables to the device."""
        dev, i32 = dense_k.device, torch.int32
        if flat.summary is None:
            raise ValueError("a decode layout scores block summaries: the flat pools need a summary tensor")
        stripes, pages = paged_tables(flat)
        empty = torch.empty(0, dense_k.shape[-1], dtype=dense_k.dtype, device=dev)
        return cls(
            packed=packed,
            stripes=stripes,
            pages=pages,
            stripe_ptr=torch.tensor(stripe_ptr, dtype=i32, device=dev),
            block_ptr=torch.tensor(block_ptr, dtype=i32, device=dev),
            block_stripe=torch.tensor(block_stripe, dtype=i32, device=dev),
            summary_kind=summary_kind,
            summary_width=flat.summary.shape[1],
            block=block,
            n_select=torch.tensor(n_select, dtype=i32, device=dev),
            dense_k=dense_k,
            dense_v=dense_v,
            dense_len=dense_len,
            kdense=empty if packed else flat.kvals,
            vdense=empty if packed else flat.vvals,
            flat=flat,
        )

    @classmethod
    def synthetic(
        cls,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        context: int,
        *,
        keep: int,
        block: int,
        token_ratio: float,
        n_sink: int,
        window: int,
        segment_len: int,
        summary_kind: int,
        summary_width: int,
        dtype: torch.dtype,
        device: torch.device | str,
        keep_v: int | None = None,
    ) -> "DecodeLayout":
        """A packed layout of random content at real sizes, for benchmarks (speed does not depend on
        the values; random scores spread the selection as far as it goes).

        Every sequence holds ``context`` tokens: ``n_sink + window`` dense, the rest in compressed
        segments of ``segment_len`` tokens (the last may be shorter), g = 1, ``keep`` random kept
        positions per K row (``keep_v`` per V row, ``keep`` when not given), orthonormal random
        rotations, ``summary_width`` random summary values per block of kind ``summary_kind`` (0
        mean/compact, 1 minmax).
        """
        keep_v = keep if keep_v is None else keep_v
        n_comp = context - n_sink - window
        if n_comp < 1 or not (0 < keep <= head_dim and 0 < keep_v <= head_dim) or head_dim % 32:
            raise ValueError(
                f"need context > n_sink + window ({n_sink} + {window}), got {context}; keep and keep_v "
                f"in [1, head_dim]; head_dim a multiple of 32 (got keep {keep}, keep_v {keep_v}, "
                f"head_dim {head_dim})"
            )
        segs = [min(segment_len, n_comp - lo) for lo in range(0, n_comp, segment_len)]
        n_words, stride_k, stride_v = head_dim // 32, round_up8(keep), round_up8(keep_v)
        rows: list[list[int]] = []
        block_stripe: list[int] = []
        nsel: list[int] = []
        stripe_ptr, block_ptr = [0], [0]
        row_base = blk = 0
        for b in range(batch):
            for h in range(n_kv_heads):
                nb_bh = 0
                for s in segs:
                    nb = -(-s // block)
                    bit, val_k, val_v = row_base * n_words, row_base * stride_k, row_base * stride_v
                    rows.append([b, h, s, keep, keep_v, 1, 1, bit, bit, val_k, val_v, blk, 0])
                    block_stripe += [len(rows) - 1] * nb
                    row_base += s
                    blk += nb
                    nb_bh += nb
                stripe_ptr.append(len(rows))
                block_ptr.append(blk)
                nsel.append(n_select(nb_bh, token_ratio))
        n_str, i32 = len(rows), torch.int32
        rot = torch.linalg.qr(torch.randn(n_str * 2, head_dim, head_dim, device=device))[0]
        cap = n_sink + window

        def values(kept: int) -> torch.Tensor:  # zero padding past `kept`, as the encoder writes it
            v = torch.zeros(row_base, round_up8(kept), device=device, dtype=dtype)
            v[:, :kept] = torch.randn(row_base, kept, device=device, dtype=dtype)
            return v.view(-1)

        flat = FlatPools(
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            rot=rot.view(n_str, 2, head_dim, head_dim).contiguous(),
            kbits=random_bitmaps(row_base, head_dim, keep, device),
            vbits=random_bitmaps(row_base, head_dim, keep_v, device),
            kvals=values(keep),
            vvals=values(keep_v),
            summary=torch.randn(blk, summary_width, device=device, dtype=dtype),
        )
        return cls.from_flat(
            flat,
            packed=True,
            stripe_ptr=stripe_ptr,
            block_ptr=block_ptr,
            block_stripe=block_stripe,
            n_select=nsel,
            summary_kind=summary_kind,
            block=block,
            dense_k=torch.randn(batch, n_kv_heads, cap, head_dim, device=device, dtype=dtype),
            dense_v=torch.randn(batch, n_kv_heads, cap, head_dim, device=device, dtype=dtype),
            dense_len=torch.full((batch,), cap, dtype=i32, device=device),
        )

    @classmethod
    def from_caches(cls, caches: list[KVCache], device: torch.device | str) -> "DecodeLayout":
        """Flatten core caches (same method, H_kv, D, dtype; mosaic or quest) for the kernels."""
        if not caches:
            raise ValueError("from_caches needs at least one cache")
        c0 = caches[0]
        m = c0.method
        if m.name not in ("mosaic", "quest"):
            raise ValueError(
                f"the CUDA kernels run 'mosaic' (packed) and 'quest' (dense) caches, got {m.name!r}; "
                "other methods run on mosaickv.core"
            )
        if not m.selects_blocks:
            raise ValueError("the CUDA decode path selects blocks: token_ratio must be < 1")
        for c in caches:
            if (c.method.name, c.n_kv_heads, c.dim, c.dtype, c.method.block_size) != (
                m.name,
                c0.n_kv_heads,
                c0.dim,
                c0.dtype,
                m.block_size,
            ):
                raise ValueError("all caches of a batch need the same method, H_kv, D, dtype and block size")
        packed = m.name == "mosaic"
        h_kv, d, blk = c0.n_kv_heads, c0.dim, m.block_size
        rows: list[list[int]] = []
        kb, vb, kv, vv, summ, rots, block_stripe = [], [], [], [], [], [], []
        stripe_ptr, block_ptr, nsel = [0], [0], []
        offs = {"kbit": 0, "vbit": 0, "kval": 0, "vval": 0, "block": 0, "row": 0}
        kinds = set()
        for b, cache in enumerate(caches):
            for h in range(h_kv):
                n_b = 0
                for seg in cache.segments:
                    kinds.add(seg.summary_kind)
                    s = seg.length
                    nb = -(-s // blk)
                    kk, kvk = seg.k.keep[h], seg.v.keep[h]
                    gk, gv = seg.k.group[h], seg.v.group[h]
                    sid = len(rows)
                    rows.append(
                        [
                            b,
                            h,
                            s,
                            kk,
                            kvk,
                            gk,
                            gv,
                            offs["kbit"],
                            offs["vbit"],
                            offs["kval"],
                            offs["vval"],
                            offs["block"],
                            offs["row"],
                        ]
                    )
                    if packed:
                        for side, bits_pool, vals_pool, kb_key, kv_key in (
                            (seg.k, kb, kv, "kbit", "kval"),
                            (seg.v, vb, vv, "vbit", "vval"),
                        ):
                            if side.bitmaps is None or side.rotation is None:
                                raise ValueError("mosaic segments must carry bitmaps and rotations")
                            bits = side.bitmaps[h]
                            bits_pool.append(bits.view(torch.int32).reshape(-1))
                            offs[kb_key] += bits.numel()
                            vals = side.values[h]
                            padded = torch.zeros(
                                s, round_up8(vals.shape[1]), dtype=vals.dtype, device=vals.device
                            )
                            padded[:, : vals.shape[1]] = vals
                            vals_pool.append(padded.reshape(-1))
                            offs[kv_key] += padded.numel()
                        rots.append(torch.stack([seg.k.rotation[h], seg.v.rotation[h]]))
                    else:
                        kv.append(seg.k.values[h])
                        vv.append(seg.v.values[h])
                        offs["row"] += s
                    summ.append(seg.summary[h])
                    block_stripe += [sid] * nb
                    offs["block"] += nb
                    n_b += nb
                stripe_ptr.append(len(rows))
                block_ptr.append(offs["block"])
                nsel.append(n_select(n_b, m.token_ratio))
        if len(kinds) > 1:
            raise ValueError(f"mixed summary kinds in one batch: {kinds}")
        kind = SUMMARY_KIND_IDS[kinds.pop()] if kinds else SUMMARY_KIND_IDS[m.summary]
        width = summ[0].shape[1] if summ else 8 * (2 if kind == 1 else 1)  # no blocks: never read
        dense = [torch.cat([c.sink_k, c.tail_k]) for c in caches]
        dense_v = [torch.cat([c.sink_v, c.tail_v]) for c in caches]
        cap = max(1, max(x.shape[0] for x in dense))
        dk = torch.zeros(len(caches), h_kv, cap, d, dtype=c0.dtype)
        dv = torch.zeros_like(dk)
        for b, (x, y) in enumerate(zip(dense, dense_v, strict=True)):
            dk[b, :, : x.shape[0]] = x.transpose(0, 1).cpu()
            dv[b, :, : y.shape[0]] = y.transpose(0, 1).cpu()

        def cat(
            parts: list[torch.Tensor], dtype: torch.dtype, shape_tail: tuple[int, ...] = ()
        ) -> torch.Tensor:
            if not parts:
                return torch.zeros((8, *shape_tail), dtype=dtype, device=device)  # never read: no stripes
            return torch.cat([p.cpu() for p in parts]).to(device)

        i32 = torch.int32
        flat = FlatPools(
            rows=torch.tensor(rows, dtype=torch.int64).reshape(-1, len(FLAT_COLS)).to(device),
            rot=torch.stack([r.cpu() for r in rots]).to(device)
            if packed and rots
            else (torch.zeros(1, 2, d, d, device=device) if packed else None),
            kbits=cat(kb, i32) if packed else torch.zeros(8, dtype=i32, device=device),
            vbits=cat(vb, i32) if packed else torch.zeros(8, dtype=i32, device=device),
            kvals=cat(kv, c0.dtype, () if packed else (d,)),
            vvals=cat(vv, c0.dtype, () if packed else (d,)),
            summary=cat(summ, c0.dtype, (width,)),
        )
        return cls.from_flat(
            flat,
            packed=packed,
            stripe_ptr=stripe_ptr,
            block_ptr=block_ptr,
            block_stripe=block_stripe,
            n_select=nsel,
            summary_kind=kind,
            block=blk,
            dense_k=dk.to(device),
            dense_v=dv.to(device),
            dense_len=torch.tensor([x.shape[0] for x in dense], dtype=i32, device=device),
        )


def auto_piece_blocks(n_select: list[int], stripes_per_head: list[int], n_sm: int | None) -> int:
    """Selected blocks per attention piece for this much work on a GPU of ``n_sm`` SMs (None: no
    GPU): MAX_PIECE_BLOCKS when the attention would still run more than LARGE_PIECE_WAVES waves of
    CTAs (ATTENTION_CTAS_PER_SM per SM) with pieces that large; else PIECE_BLOCKS, halved down to
    WAVE_PIECE_BLOCKS while the halves still make at most one wave, and down to MIN_PIECE_BLOCKS
    while there would be fewer CTAs than SMs. The same for packed rows and the dense baseline's
    (one attention kernel)."""
    if n_sm is None:
        return PIECE_BLOCKS

    def ctas(size: int) -> int:  # the most pieces (one more per stripe for its partial last piece)
        return sum(-(-n // size) + m for n, m in zip(n_select, stripes_per_head, strict=True))

    wave = ATTENTION_CTAS_PER_SM * n_sm
    if ctas(MAX_PIECE_BLOCKS) > LARGE_PIECE_WAVES * wave:
        return MAX_PIECE_BLOCKS
    size = PIECE_BLOCKS
    while size > MIN_PIECE_BLOCKS and (
        ctas(size) < n_sm or (size // 2 >= WAVE_PIECE_BLOCKS and ctas(size // 2) <= wave)
    ):
        size //= 2
    return size


@functools.cache
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for any other device."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@dataclass
class DecodeWorkspace:
    """Buffers of one decode step, sized once by ``plan`` and reused across layers and steps.

    Attributes:
        qrot: [n_stripes, G, D] f32; keys: [n_blocks] int32; sel: [B*H, max_select] int32;
        pieces: [B*H, max_pieces, 3] int32; n_pieces: [B*H] int32; stripe_first: [n_stripes] int32
        (the select's scratch); stripe_pieces: [n_stripes, 2] int32 (each stripe's first piece and
        number of pieces); arrivals: [B*H] int32 (the merge's count of each (b, h)'s stripes
        done); part_o: [B*H, max_pieces + 1, G, D]
        f32; part_ml: [B*H, max_pieces + 1, G, 2] f32; stripe_out: [B*H, max_stripes + 1, G, D] f32;
        stripe_ml: [B*H, max_stripes + 1, G, 2] f32; status: [1] int32 (kernel status bits,
        mosaickv/params.h).
    """

    qrot: torch.Tensor
    keys: torch.Tensor
    sel: torch.Tensor
    pieces: torch.Tensor
    n_pieces: torch.Tensor
    stripe_first: torch.Tensor
    stripe_pieces: torch.Tensor
    arrivals: torch.Tensor
    part_o: torch.Tensor
    part_ml: torch.Tensor
    stripe_out: torch.Tensor
    stripe_ml: torch.Tensor
    status: torch.Tensor
    piece_blocks: int

    @classmethod
    def plan(cls, layout: DecodeLayout, gqa_group: int, piece_blocks: int | None = None) -> "DecodeWorkspace":
        """Size the buffers for ``layout`` (reads its small int tables on the host once: a caller
        that knows them already uses ``sized``, which never waits for the device). ``piece_blocks``:
        selected blocks per attention CTA, or None for ``auto_piece_blocks``'s choice."""
        n_str = (layout.stripe_ptr[1:] - layout.stripe_ptr[:-1]).tolist()
        n_blocks = layout.block_stripe.numel()
        return cls.sized(layout, gqa_group, layout.n_select.tolist(), n_str, n_blocks, piece_blocks)

    @classmethod
    def sized(
        cls,
        layout: DecodeLayout,
        gqa_group: int,
        n_select: list[int],
        stripes_per_head: list[int],
        n_blocks: int,
        piece_blocks: int | None = None,
        reuse: "DecodeWorkspace | None" = None,
    ) -> "DecodeWorkspace":
        """The buffers for ``layout`` given its per-(b, h) selected blocks and stripes and its block
        count, as the host built them. ``reuse`` (an earlier layout's workspace, whose launches are
        ordered before this layout's on the stream) is returned when it fits: the kernels size
        their grids by sel, pieces and stripe_out, which must match, and only index into qrot,
        stripe_first, stripe_pieces and keys, which may be larger (new ones get an
        eighth more rows, so that a cache growing by a block per head keeps its workspace for a
        while)."""
        dev = layout.dense_k.device
        if piece_blocks is None:
            piece_blocks = auto_piece_blocks(n_select, stripes_per_head, sm_count(dev))
        if not 1 <= piece_blocks <= MAX_PIECE_BLOCKS:
            raise ValueError(
                f"piece_blocks must be in [1, {MAX_PIECE_BLOCKS}] (the attention CTA stages that many "
                f"block ids), got {piece_blocks}"
            )
        bh = layout.batch * layout.n_kv_heads
        max_select = max(1, *n_select) if bh else 1
        max_stripes = max(stripes_per_head) if bh else 0
        pieces = [-(-n // piece_blocks) + m for n, m in zip(n_select, stripes_per_head, strict=True)]
        max_pieces = max(1, *pieces) if bh else 1
        g, d = gqa_group, layout.head_dim
        n_stripes = layout.stripes.shape[0]
        if (
            reuse is not None
            and reuse.sel.shape == (bh, max_select)
            and reuse.pieces.shape[1] == max_pieces
            and reuse.stripe_out.shape[1:3] == (max_stripes + 1, g)
            and reuse.qrot.shape[1:] == (g, d)
            and reuse.piece_blocks == piece_blocks
            and reuse.qrot.shape[0] >= n_stripes
            and reuse.stripe_first.shape[0] >= n_stripes  # and so stripe_pieces (same rows)
            and reuse.keys.numel() >= n_blocks
        ):
            return reuse
        f32, i32 = torch.float32, torch.int32
        stripe_rows = max(1, n_stripes + n_stripes // 8)
        return cls(
            qrot=torch.empty(stripe_rows, g, d, dtype=f32, device=dev),
            keys=torch.empty(max(1, n_blocks + n_blocks // 8), dtype=i32, device=dev),
            sel=torch.empty(bh, max_select, dtype=i32, device=dev),
            pieces=torch.empty(bh, max_pieces, 3, dtype=i32, device=dev),
            n_pieces=torch.empty(bh, dtype=i32, device=dev),
            stripe_first=torch.empty(stripe_rows, dtype=i32, device=dev),
            stripe_pieces=torch.empty(stripe_rows, 2, dtype=i32, device=dev),
            arrivals=torch.zeros(bh, dtype=i32, device=dev),
            part_o=torch.empty(bh, max_pieces + 1, g, d, dtype=f32, device=dev),
            part_ml=torch.empty(bh, max_pieces + 1, g, 2, dtype=f32, device=dev),
            stripe_out=torch.empty(bh, max_stripes + 1, g, d, dtype=f32, device=dev),
            stripe_ml=torch.empty(bh, max_stripes + 1, g, 2, dtype=f32, device=dev),
            status=torch.zeros(1, dtype=i32, device=dev),
            piece_blocks=piece_blocks,
        )


@dataclass
class AppendPools(FlatPools):
    """Open segments of many stripes (any layers x requests x KV heads) in one set of flat pools:
    what ``append_encode`` writes, K and V of every stripe in one launch.

    Attributes (beyond FlatPools', whose ``rows`` hold each stripe's capacity in ``tokens`` and
    whose summary rows are the keys' block summaries, block_off per stripe):
        stripes, pages: the kernels' stripe and page tables over these pools (``paged_tables``).
        block_sum: [n, summary_width] float32 fp32 sum of the open block's rotated keys (mean kinds:
            the append updates means from it without rereading earlier tokens), else None.
        summary_kind: 0 mean/compact, 1 minmax/compact_minmax.
        channels: truncation c (D for none); block: token block size B.
    """

    stripes: torch.Tensor
    pages: torch.Tensor
    block_sum: torch.Tensor | None
    summary_kind: int
    channels: int
    block: int

    @classmethod
    def allocate(
        cls,
        capacity: int,
        rot: torch.Tensor,
        keep_k: list[int],
        keep_v: list[int],
        group_k: list[int],
        group_v: list[int],
        *,
        summary_kind: int,
        summary_width: int,
        block: int,
        dtype: torch.dtype,
        channels: int | None = None,
    ) -> "AppendPools":
        """Zeroed pools for len(keep_k) stripes of ``capacity`` rows each, one after another.

        rot: [n, 2, D, D] float32 (its device is the pools'); keep_*/group_*: per stripe;
        summary_width 0: no summaries (and no block sums).
        """
        n, d, dev = rot.shape[0], rot.shape[-1], rot.device
        if rot.shape != (n, 2, d, d) or not all(len(x) == n for x in (keep_k, keep_v, group_k, group_v)):
            raise ValueError(f"rot must be [n, 2, D, D] and keep/group lists of n = {n} entries")
        rows, offs = [], [0, 0, 0, 0]  # kbit, vbit, kval, vval
        nb = -(-capacity // block)
        for i in range(n):
            rows.append([0, i, capacity, keep_k[i], keep_v[i], group_k[i], group_v[i], *offs, i * nb, 0])
            offs[0] += capacity * bitmap_words(d, group_k[i])
            offs[1] += capacity * bitmap_words(d, group_v[i])
            offs[2] += capacity * round_up8(keep_k[i])
            offs[3] += capacity * round_up8(keep_v[i])
        i32 = torch.int32
        kbits, vbits = (
            torch.zeros(offs[0], dtype=i32, device=dev),
            torch.zeros(offs[1], dtype=i32, device=dev),
        )
        kvals, vvals = (
            torch.zeros(offs[2], dtype=dtype, device=dev),
            torch.zeros(offs[3], dtype=dtype, device=dev),
        )
        summary = torch.zeros(n * nb, summary_width, dtype=dtype, device=dev) if summary_width else None
        flat = FlatPools(torch.tensor(rows, dtype=torch.int64), rot, kbits, vbits, kvals, vvals, summary)
        stripes, pages = paged_tables(flat)
        return cls(
            rows=flat.rows.to(dev),
            rot=rot,
            kbits=kbits,
            vbits=vbits,
            kvals=kvals,
            vvals=vvals,
            summary=summary,
            stripes=stripes,
            pages=pages,
            block_sum=torch.zeros(n, summary_width, device=dev)
            if summary_width and summary_kind == 0
            else None,
            summary_kind=summary_kind,
            channels=d if channels is None else channels,
            block=block,
        )

    def stripe_rows(self, which: int, stripe: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) of one side (0 K, 1 V) of a stripe: values [hi - lo, round_up8(keep)] and
        bitmap words [hi - lo, W] int32 (views into the pools)."""
        meta = self.rows[stripe].tolist()
        col = {name: i for i, name in enumerate(FLAT_COLS)}
        side = "k" if which == 0 else "v"
        keep, g = meta[col[f"keep_{side}"]], meta[col[f"group_{side}"]]
        ks, w = round_up8(keep), bitmap_words(self.rot.shape[-1], g)
        vals, bits = (self.kvals, self.kbits) if which == 0 else (self.vvals, self.vbits)
        v0, b0 = meta[col[f"{side}val_off"]], meta[col[f"{side}bit_off"]]
        return vals[v0 + lo * ks : v0 + hi * ks].view(-1, ks), bits[b0 + lo * w : b0 + hi * w].view(-1, w)
