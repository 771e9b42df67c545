"""torch custom ops over the CUDA kernels, with fake (meta) implementations for tracing.

``encode_side`` is functional and has a CPU implementation built from the core reference (rotate,
``pack_topk``, ``block_summaries``), so it runs anywhere and returns the same flat layout.
``append_encode_`` encodes the new tokens of many stripes (any layers and requests, K and V) in one
launch; ``append_to_pools`` runs it over ``AppendPools``, or on CPU the torch reference below
(``pack_topk`` of the core plus running block summaries), which the GPU tests use as the oracle.
``encode_into_``, ``append_encode_`` and ``decode_`` run on CUDA only and read and write through the
page table (``pages``, device addresses; layout.STRIPE_COLS): torch sees only their tables and
workspaces, so the memory behind the pages must outlive the launch (the layouts and pools own it).
On CPU, decode through ``mosaickv.ops.DecodePlan``, which calls ``KVCache.attend`` of the core reference.
"""

import ctypes

import torch

from mosaickv.core import bitmap_words, block_summaries, pack_topk
from mosaickv.ops import _ext
from mosaickv.ops.layout import (
    APPEND_COLS,
    FLAT_COLS,
    STRIPE_COLS,
    AppendPools,
    DecodeLayout,
    DecodeWorkspace,
    FlatPools,
    paged_tables,
    round_up8,
)

STAGE_ALL = 31  # rotate q | score | select | attend | merge (Stage in cuda/mosaickv/params.h)
# Status bits (Status in cuda/mosaickv/params.h) that the append reference sets like the kernel.
STATUS_BAD_KEEP, STATUS_BAD_GROUP, STATUS_BAD_BLOCK, STATUS_BAD_APPEND_ROW = 1, 2, 4, 64

SUMMARY_KIND_NAMES = {0: "compact", 1: "compact_minmax"}


def _side_sizes(n: int, d: int, keep: list[int], group: list[int]) -> tuple[int, int]:
    vals = sum(n * round_up8(k) for k in keep)
    bits = sum(n * bitmap_words(d, g) for g in group)
    return vals, bits


@torch.library.custom_op("mosaickv::encode_side", mutates_args=())
def encode_side(
    x: torch.Tensor,
    rot: torch.Tensor,
    keep: list[int],
    group: list[int],
    channels: int,
    block: int,
    summary_kind: int,
    summary_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode one side (K or V) of one segment for every KV head.

    Args:
        x: [S, H, D] bfloat16/float16, unrotated post-RoPE vectors (S >= 1).
        rot: [H, D, D] float32, rows = eigenvectors (x' = R x).
        keep, group: per head k_h (multiple of g_h) and g_h in {1, 2, 4}.
        channels: truncation c (multiple of every g_h, <= D); D for none.
        block: token block size B. summary_kind: 0 mean/compact (first summary_width channels),
            1 [min | max] over the first summary_width / 2 channels (minmax when that is D, else
            compact_minmax); summary_width 0 = no summaries (values).
    Returns:
        vals: flat [sum_h S * round_up8(k_h)] x.dtype, head h's rows of stride round_up8(k_h), zero padded;
        bits: flat [sum_h S * W_h] int32 (uint32 bit patterns, W_h = ceil(D / g_h / 32));
        summary: [H, ceil(S / B), summary_width] x.dtype.
    """
    s, h, d = x.shape
    _check_encode_args(x, rot, keep, group, channels, block, summary_kind, summary_width)
    if x.is_cuda:
        ext = _ext.require()
        n_vals, n_bits = _side_sizes(s, d, keep, group)
        vals = torch.empty(n_vals, dtype=x.dtype, device=x.device)
        bits = torch.empty(n_bits, dtype=torch.int32, device=x.device)
        nb = -(-s // block)
        summary = torch.empty(h, nb, summary_width, dtype=x.dtype, device=x.device)
        rows, vo, bo = [], 0, 0
        for i in range(h):
            rows.append([0, i, s, keep[i], keep[i], group[i], group[i], bo, bo, vo, vo, i * nb, 0])
            vo += s * round_up8(keep[i])
            bo += s * bitmap_words(d, group[i])
        rot2 = torch.zeros(h, 2, d, d, dtype=torch.float32, device=x.device)
        rot2[:, 0] = rot
        flat_summary = summary.view(-1, summary_width) if summary_width else None
        # K only: the V columns point at the same pools and are never used (which = 0)
        flat = FlatPools(torch.tensor(rows, dtype=torch.int64), rot2, bits, bits, vals, vals, flat_summary)
        stripes, pages = paged_tables(flat)
        status = torch.zeros(1, dtype=torch.int32, device=x.device)
        ids = torch.arange(h, dtype=torch.int32, device=x.device)
        ext.encode(x, 0, ids, stripes, pages, 0, summary_kind, summary_width, channels, block, status)
        return vals, bits, summary
    xr = torch.einsum("shd,hed->hse", x.float(), rot.float())
    vals_parts, bits_parts = [], []
    for i in range(h):
        v, b = pack_topk(xr[i], keep[i], group[i], channels if channels < d else None, x.dtype)
        padded = torch.zeros(s, round_up8(keep[i]), dtype=x.dtype, device=x.device)
        padded[:, : keep[i]] = v
        vals_parts.append(padded.reshape(-1))
        bits_parts.append(b.view(torch.int32).reshape(-1))
    if summary_width:
        m = summary_width // 2 if summary_kind == 1 else summary_width
        summary = block_summaries(xr, block, SUMMARY_KIND_NAMES[summary_kind], m, x.dtype)
    else:
        summary = torch.empty(h, -(-s // block), 0, dtype=x.dtype, device=x.device)
    return torch.cat(vals_parts), torch.cat(bits_parts), summary


@encode_side.register_fake
def _(x, rot, keep, group, channels, block, summary_kind, summary_width):
    s, h, d = x.shape
    n_vals, n_bits = _side_sizes(s, d, keep, group)
    return (
        x.new_empty(n_vals),
        x.new_empty(n_bits, dtype=torch.int32),
        x.new_empty(h, -(-s // block), summary_width),
    )


def _check_encode_args(
    x: torch.Tensor,
    rot: torch.Tensor,
    keep: list[int],
    group: list[int],
    channels: int,
    block: int,
    summary_kind: int,
    summary_width: int,
) -> None:
    if x.dim() != 3 or x.shape[0] < 1:
        raise ValueError(f"x must be [S >= 1, H, D], got shape {tuple(x.shape)}")
    s, h, d = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bfloat16 or float16 (the storage dtypes), got {x.dtype}")
    if rot.shape != (h, d, d):
        raise ValueError(f"rot must be [H, D, D] = [{h}, {d}, {d}], got {tuple(rot.shape)}")
    if len(keep) != h or len(group) != h:
        raise ValueError(f"keep and group need one entry per head ({h}), got {len(keep)} and {len(group)}")
    for k, g in zip(keep, group, strict=True):
        if g not in (1, 2, 4) or k % g or not 0 < k <= channels or channels % g:
            raise ValueError(
                f"keep {k} must be a positive multiple of g {g} (1, 2 or 4), <= channels {channels}, "
                "and channels a multiple of g"
            )
    if not 0 < channels <= d:
        raise ValueError(f"channels must be in [1, D = {d}], got {channels}")
    if not 1 <= block <= 64:
        raise ValueError(f"block must be in [1, 64], got {block}")
    _check_summary(summary_kind, summary_width, d)


def _check_summary(kind: int, width: int, d: int) -> None:
    """The summary kinds and widths the kernels read and write (the binding checks the same)."""
    if kind not in SUMMARY_KIND_NAMES:
        raise ValueError(f"summary_kind must be 0 (mean/compact) or 1 (minmax), got {kind}")
    if (kind == 1 and (width % 16 or width > 2 * d)) or (kind == 0 and (width % 8 or width > d)):
        raise ValueError(
            f"summary_width must be 0, a multiple of 8 <= D for mean/compact, or 2m (m a multiple of 8, "
            f"m <= D) for minmax; got {width}"
        )


@torch.library.custom_op("mosaickv::encode_into_", mutates_args=("status",), device_types="cuda")
def encode_into_(
    x: torch.Tensor,
    token0: int,
    stripe_ids: torch.Tensor,
    stripes: torch.Tensor,
    pages: torch.Tensor,
    which: int,
    summary_kind: int,
    summary_width: int,
    n_channels: int,
    block: int,
    status: torch.Tensor,
) -> None:
    """Encode tokens [token0, token0 + n) of one segment, every head, into its pages in place.

    x: [n, H, D] storage dtype (any token/head strides, contiguous D); stripe_ids: [H] int32 rows of
    ``stripes`` ([n_stripes, len(STRIPE_COLS)] int64); pages: int64 device addresses; which: 0 keys
    (with summaries when summary_width > 0), 1 values; status: [1] int32. For appended decode tokens
    pass token0 at the start of the last (partial) block.
    """
    _ext.require().encode(
        x, token0, stripe_ids, stripes, pages, which, summary_kind, summary_width, n_channels, block, status
    )


@encode_into_.register_fake
def _(x, token0, stripe_ids, stripes, pages, which, summary_kind, summary_width, n_channels, block, status):
    return None


def append_encode(
    x_k: torch.Tensor,
    x_v: torch.Tensor,
    rows: torch.Tensor,
    stripes: torch.Tensor,
    pages: torch.Tensor,
    block_sum: torch.Tensor | None,
    summary_kind: int,
    summary_width: int,
    head_dim: int,
    n_channels: int,
    block: int,
    status: torch.Tensor,
    max_tokens: int = 0,
) -> None:
    """Encode new tokens of many stripes, K and V, into their pages in place (one CUDA launch).

    Launched directly: the decode path calls this, not the torch op ``append_encode_`` (the same
    function, for torch.compile and tracing), whose Python dispatch is that of ``decode_`` (see
    ``run_decode``).

    Args:
        x_k, x_v: contiguous storage-dtype tensors of any shape holding the new tokens' unrotated
            vectors (e.g. [L, B, H, n, D] stacked window rows): row r's token j is
            x.view(-1)[x_off + j * x_stride :][:D]; x_off and x_stride multiples of 4.
        rows: [n_rows, 5] int64, columns APPEND_COLS (stripe, x_off, x_stride, tokens, pos); at most
            one row per stripe per call.
        stripes: [n_stripes, len(STRIPE_COLS)] int64 (keep, g and page tables per side, summary and
            rotation pages; ``tokens`` = the stripe's capacity in rows, which an append must not
            pass); pages: int64 device addresses.
        block_sum: [n_stripes, summary_width] float32, the fp32 sum of each open block's rotated keys
            (mean/compact summaries, kept current by this op), else None. Key summaries of the
            block(s) the tokens fall in are updated from the new tokens alone (min/max with the stored row).
        summary_kind: 0 mean/compact (width m), 1 minmax (width 2m); summary_width 0: no summaries;
        head_dim: D; n_channels: truncation c (D for none); block: token block size B; status: [1]
            int32, Status bits are ORed in (bad rows are skipped, the others still encoded).
        max_tokens: the most tokens any row appends, if known: rows longer than 16 tokens are then
            split over several CTAs (an eviction of 256 tokens: 17 instead of one, each with whole
            blocks); 0 (or too small a bound): one CTA per row for all of it, which is exact too.
    CPU tensors: use ``append_to_pools``, whose CPU path is the torch reference.
    """
    _check_append_args(x_k, x_v, rows, stripes, pages, block_sum)
    _check_append_settings(block_sum, summary_kind, summary_width, n_channels, block, head_dim)
    if not x_k.is_cuda:
        raise ValueError(
            "append_encode runs on CUDA (it writes through device addresses); on CPU use "
            "append_to_pools, which runs the torch reference"
        )
    _ext.require().append_encode(
        x_k,
        x_v,
        rows,
        stripes,
        pages,
        block_sum,
        summary_kind,
        summary_width,
        head_dim,
        n_channels,
        block,
        status,
        max_tokens,
    )


# The same function as a torch op (schema from its annotations), for torch.compile and tracing.
append_encode_ = torch.library.custom_op(
    "mosaickv::append_encode_", append_encode, mutates_args=("block_sum", "status")
)


@append_encode_.register_fake
def _(*args: object) -> None:  # mutates its block sums and status only: nothing to describe
    return None


def append_to_pools(
    pools: AppendPools,
    x_k: torch.Tensor,
    x_v: torch.Tensor,
    rows: torch.Tensor,
    status: torch.Tensor,
    max_tokens: int = 0,
) -> None:
    """Append-encode into ``pools`` (rows: [n_rows, 5] int64, APPEND_COLS; status: [1] int32):
    ``append_encode`` on CUDA (``max_tokens`` as there), ``append_encode_reference`` on CPU."""
    p = pools
    width = 0 if p.summary is None else p.summary.shape[1]
    d = p.rot.shape[-1]
    if x_k.is_cuda:
        append_encode(
            x_k,
            x_v,
            rows,
            p.stripes,
            p.pages,
            p.block_sum,
            p.summary_kind,
            width,
            d,
            p.channels,
            p.block,
            status,
            max_tokens,
        )
    else:
        _check_append_args(x_k, x_v, rows, p.stripes, p.pages, p.block_sum)
        _check_append_settings(p.block_sum, p.summary_kind, width, p.channels, p.block, d)
        append_encode_reference(p, x_k, x_v, rows, status)


def _check_append_args(
    x_k: torch.Tensor,
    x_v: torch.Tensor,
    rows: torch.Tensor,
    stripes: torch.Tensor,
    pages: torch.Tensor,
    block_sum: torch.Tensor | None,
) -> None:
    if x_k.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x_k must be bfloat16 or float16 (the storage dtypes), got {x_k.dtype}")
    if x_v.dtype != x_k.dtype or x_v.shape != x_k.shape or not (x_k.is_contiguous() and x_v.is_contiguous()):
        raise ValueError("x_k and x_v must be contiguous with the same shape and dtype")
    if rows.dtype != torch.int64 or rows.dim() != 2 or rows.shape[1] != len(APPEND_COLS):
        raise ValueError(
            f"rows must be [n_rows, {len(APPEND_COLS)}] int64 ({APPEND_COLS}), got {tuple(rows.shape)}"
        )
    n = stripes.shape[0]
    if stripes.dtype != torch.int64 or stripes.dim() != 2 or stripes.shape[1] != len(STRIPE_COLS):
        raise ValueError(f"stripes must be [n, {len(STRIPE_COLS)}] int64, got {tuple(stripes.shape)}")
    if pages.dtype != torch.int64 or pages.dim() != 1:
        raise ValueError(
            f"pages must be a flat int64 tensor of addresses, got {tuple(pages.shape)} {pages.dtype}"
        )
    if block_sum is not None and (block_sum.dtype != torch.float32 or block_sum.shape[0] != n):
        raise ValueError(f"block_sum must be [n_stripes = {n}, width] float32")
    tensors = [x_k, x_v, rows, stripes, pages] + ([block_sum] if block_sum is not None else [])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {[t.device for t in tensors]}")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("every tensor must be contiguous (rows and tables are addressed flat)")


def _check_append_settings(
    block_sum: torch.Tensor | None,
    kind: int,
    width: int,
    n_channels: int,
    block: int,
    d: int,
) -> None:
    if not 1 <= block <= 64:
        raise ValueError(f"block must be in [1, 64], got {block}")
    if not 0 < n_channels <= d:
        raise ValueError(f"n_channels must be in [1, D = {d}], got {n_channels}")
    if not width:
        return
    _check_summary(kind, width, d)
    if kind == 0 and (block_sum is None or block_sum.shape[1] != width):
        raise ValueError(f"mean/compact summaries need block_sum [n_stripes, {width}] float32")


def append_encode_reference(
    pools: AppendPools, x_k: torch.Tensor, x_v: torch.Tensor, rows: torch.Tensor, status: torch.Tensor
) -> None:
    """``append_encode_`` in torch over flat pools, on any device: rotate in float32, ``pack_topk`` of
    the core, the same running summaries and the same status bits as the kernel (a bad row or side
    is skipped; rows past a pool's end are flagged too)."""
    stripes, rot, summary, block_sum = pools.rows, pools.rot, pools.summary, pools.block_sum
    kbits, vbits, kvals, vvals = pools.kbits, pools.vbits, pools.kvals, pools.vvals
    summary_kind, n_channels, block = pools.summary_kind, pools.channels, pools.block
    d = rot.shape[-1]
    col = {name: i for i, name in enumerate(FLAT_COLS)}
    flat_k, flat_v = x_k.view(-1), x_v.view(-1)
    bad = 0
    for stripe, x_off, x_stride, n, pos in rows.tolist():
        if not (0 <= stripe < stripes.shape[0] and n >= 1 and min(pos, x_off, x_stride) >= 0) or (
            x_off % 4 or x_stride % 4 or x_off + (n - 1) * x_stride + d > flat_k.numel()
        ):
            bad |= STATUS_BAD_APPEND_ROW
            continue
        meta = stripes[stripe].tolist()
        idx = (
            x_off
            + torch.arange(n, device=x_k.device)[:, None] * x_stride
            + torch.arange(d, device=x_k.device)
        )
        for which, side, flat, bits, vals in ((0, "k", flat_k, kbits, kvals), (1, "v", flat_v, vbits, vvals)):
            keep, g = meta[col[f"keep_{side}"]], meta[col[f"group_{side}"]]
            if g not in (1, 2, 4):
                bad |= STATUS_BAD_GROUP
                continue
            if keep <= 0 or keep % g or keep > n_channels or n_channels % g:
                bad |= STATUS_BAD_KEEP
                continue
            ks, w = round_up8(keep), bitmap_words(d, g)
            v0, b0, blk0 = meta[col[f"{side}val_off"]], meta[col[f"{side}bit_off"]], meta[col["block_off"]]
            summarise = which == 0 and summary is not None
            if (
                pos + n > meta[col["tokens"]]
                or min(v0, b0) < 0
                or v0 + (pos + n) * ks > vals.numel()
                or b0 + (pos + n) * w > bits.numel()
                or (summarise and not 0 <= blk0 <= blk0 + (pos + n - 1) // block < summary.shape[0])
            ):
                bad |= STATUS_BAD_APPEND_ROW
                continue
            xr = flat[idx].float() @ rot[stripe, which].T  # [n, D] rotated, float32
            packed, bitmap = pack_topk(xr, keep, g, n_channels if n_channels < d else None, vals.dtype)
            out = vals[v0 + pos * ks : v0 + (pos + n) * ks].view(n, ks)
            out.zero_()
            out[:, :keep] = packed
            bits[b0 + pos * w : b0 + (pos + n) * w].copy_(bitmap.view(torch.int32).reshape(-1))
            if summarise:
                _update_open_summaries(xr, pos, summary, block_sum, summary_kind, block, blk0, stripe)
    status |= bad


def _update_open_summaries(
    xr: torch.Tensor,
    pos: int,
    summary: torch.Tensor,
    block_sum: torch.Tensor | None,
    kind: int,
    block: int,
    block_off: int,
    stripe: int,
) -> None:
    """Fold rotated keys xr ([n, D] float32, stripe tokens pos..) into their blocks' summaries, as the
    kernel does: min/max with the stored row, means from the fp32 open-block sum."""
    width = summary.shape[1]
    m = width if kind == 0 else width // 2
    lo = hi = torch.zeros(m, device=xr.device)
    if pos % block:
        row = summary[block_off + pos // block].float()
        lo, hi = (block_sum[stripe].clone(), None) if kind == 0 else (row[:m], row[m:])
    for j in range(xr.shape[0]):
        t, v = pos + j, xr[j, :m]
        i = t % block
        if kind == 0:
            lo = v.clone() if i == 0 else lo + v
        else:
            lo, hi = (v, v) if i == 0 else (torch.minimum(lo, v), torch.maximum(hi, v))
        if i == block - 1 or j == xr.shape[0] - 1:
            dest = summary[block_off + t // block]
            dest.copy_(lo / (i + 1) if kind == 0 else torch.cat([lo, hi]))
    if kind == 0:
        block_sum[stripe] = lo


@torch.library.custom_op(
    "mosaickv::decode_",
    mutates_args=(
        "out",
        "qrot",
        "keys",
        "sel",
        "pieces",
        "n_pieces",
        "stripe_first",
        "stripe_pieces",
        "arrivals",
        "part_o",
        "part_ml",
        "stripe_out",
        "stripe_ml",
        "status",
    ),
    device_types="cuda",
)
def decode_(
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    packed: bool,
    stages: int,
    stripes: torch.Tensor,
    stripe_ptr: torch.Tensor,
    block_ptr: torch.Tensor,
    block_stripe: torch.Tensor,
    pages: torch.Tensor,
    kdense: torch.Tensor,
    vdense: torch.Tensor,
    summary_kind: int,
    summary_width: int,
    block: int,
    n_select: torch.Tensor,
    dense_k: torch.Tensor,
    dense_v: torch.Tensor,
    dense_len: torch.Tensor,
    dense_rows: torch.Tensor | None,
    qrot: torch.Tensor,
    keys: torch.Tensor,
    sel: torch.Tensor,
    pieces: torch.Tensor,
    n_pieces: torch.Tensor,
    stripe_first: torch.Tensor,
    stripe_pieces: torch.Tensor,
    arrivals: torch.Tensor,
    piece_blocks: int,
    part_o: torch.Tensor,
    part_ml: torch.Tensor,
    stripe_out: torch.Tensor,
    stripe_ml: torch.Tensor,
    status: torch.Tensor,
) -> None:
    """One decode step of one layer for a batch: q [B, H_q, D] -> out [B, H_q, D] (same dtype).

    Tensors are a ``DecodeLayout`` and a ``DecodeWorkspace`` (mosaickv.ops.layout): packed rows,
    summaries and rotations are read through ``pages``; kdense/vdense are the dense baseline's rows
    (any tensor of q's dtype when packed); dense_rows, when given, the addresses of each sequence's
    own sinks + window rows (``DecodeLayout.dense_rows``). ``stages`` is a bit mask (1 rotate q,
    2 score, 4 select, 8 attend, 16 merge; 31 = all) for timing one stage.
    """
    _ext.require().decode(
        q,
        out,
        scale,
        packed,
        stages,
        stripes,
        stripe_ptr,
        block_ptr,
        block_stripe,
        pages,
        kdense,
        vdense,
        summary_kind,
        summary_width,
        block,
        n_select,
        dense_k,
        dense_v,
        dense_len,
        dense_rows,
        qrot,
        keys,
        sel,
        pieces,
        n_pieces,
        stripe_first,
        stripe_pieces,
        arrivals,
        piece_blocks,
        part_o,
        part_ml,
        stripe_out,
        stripe_ml,
        status,
    )


@decode_.register_fake
def _(*args: object) -> None:  # mutates its workspace arguments only: nothing to describe
    return None


def decode_args(
    layout: DecodeLayout, ws: DecodeWorkspace, q: torch.Tensor, out: torch.Tensor, scale: float, stages: int
) -> tuple[object, ...]:
    """The arguments of ``decode_`` (and of the extension's ``decode``), in order."""
    lay = layout
    return (q, out, scale, lay.packed, stages, lay.stripes, lay.stripe_ptr, lay.block_ptr, lay.block_stripe,
            lay.pages, lay.kdense, lay.vdense, lay.summary_kind, lay.summary_width, lay.block, lay.n_select,
            lay.dense_k, lay.dense_v, lay.dense_len, lay.dense_rows, ws.qrot, ws.keys, ws.sel, ws.pieces,
            ws.n_pieces, ws.stripe_first, ws.stripe_pieces, ws.arrivals, ws.piece_blocks, ws.part_o,
            ws.part_ml, ws.stripe_out, ws.stripe_ml, ws.status)  # fmt: skip


def run_decode(
    layout: DecodeLayout,
    ws: DecodeWorkspace,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    stages: int = STAGE_ALL,
) -> torch.Tensor:
    """``decode_`` over a layout and its workspace: q [B, H_q, D] contiguous -> out [B, H_q, D] (q's
    dtype), written in place and returned. ``ws`` comes from ``DecodeWorkspace.plan(layout, H_q / H_kv)``.

    Launches the extension directly rather than through the torch op ``decode_``, whose Python
    dispatch (ten mutated arguments, each bumped) cost 0.25 ms per call: 16.1 against 8.1 ms for a
    32-layer eager step (bench/decode/README.md, "The whole decode step through the manager")."""
    if not q.is_cuda:
        raise ValueError("run_decode runs on CUDA; on CPU attend with mosaickv.ops.DecodePlan (the core)")
    _ext.require().decode(*decode_args(layout, ws, q, out, scale, stages))
    return out


def append_dense_rows(
    k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, skip: torch.Tensor, cap: int
) -> None:
    """Append k[b], v[b] ([B, H_kv, D] contiguous, rows a multiple of 16 bytes) as row ``lengths[b]``
    of sequence b's dense K rows at address ``rows[0, b]`` and V rows at ``rows[1, b]`` (each
    [H_kv, cap, D]), then advance ``lengths[b]``, in one launch on the current stream; a sequence with
    ``skip[b]`` set is left alone and the mark cleared; a full buffer is never written past. rows
    [2, B] int64, lengths and skip [B] int32, all on k's device (``mosaickv.cache.dense_batch``);
    the buffers must stay allocated until the launch has run. On CPU tensors the same writes, by
    the same addresses, in Python (the reference the CPU tests run)."""
    if k.is_cuda:
        _ext.require().append_dense_rows(k, v, rows, lengths, skip, cap)
        return
    batch, n_heads, d = k.shape
    if rows.shape != (2, batch) or lengths.numel() != batch or skip.numel() != batch:
        raise ValueError(f"rows must be [2, {batch}] and lengths, skip [{batch}]: one entry per sequence")
    row_bytes = d * k.element_size()
    k, v = k.contiguous(), v.contiguous()
    for b in range(batch):
        row = int(lengths[b])
        if int(skip[b]) or row >= cap:
            skip[b] = 0
            continue
        for side, x in enumerate((k, v)):
            base = int(rows[side, b])
            for h in range(n_heads):
                ctypes.memmove(base + (h * cap + row) * row_bytes, x[b, h].data_ptr(), row_bytes)
        lengths[b] = row + 1
