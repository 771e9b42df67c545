"""torch custom ops over the CUDA kernels, with fake (meta) implementations for tracing.

``encode_side`` is functional and has a CPU implementation built from the core reference (rotate,
``pack_topk``, ``block_summaries``), so it runs anywhere and returns the same flat layout.
``encode_into_`` and ``decode_`` write into caller-owned buffers (plan once, run many; CUDA-graph
capturable) and run on CUDA only: on CPU, decode through ``mosaickv.ops.DecodePlan``, which calls
``KVCache.attend`` of the core reference.
"""

import torch

from mosaickv.core import bitmap_words, block_summaries, pack_topk
from mosaickv.ops import _ext
from mosaickv.ops.layout import DecodeLayout, DecodeWorkspace, round_up8

STAGE_ALL = 31  # rotate q | score | select | attend | merge (Stage in cuda/mosaickv/params.h)

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
        stripes = torch.tensor(rows, dtype=torch.int64, device=x.device)
        rot2 = torch.zeros(h, 2, d, d, dtype=torch.float32, device=x.device)
        rot2[:, 0] = rot
        status = torch.zeros(1, dtype=torch.int32, device=x.device)
        ids = torch.arange(h, dtype=torch.int32, device=x.device)
        ext.encode(
            x,
            0,
            ids,
            stripes,
            rot2,
            0,
            bits,
            vals,
            summary.view(-1, summary_width) if summary_width else None,
            summary_kind,
            channels,
            block,
            status,
        )
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
    if summary_kind not in SUMMARY_KIND_NAMES:
        raise ValueError(f"summary_kind must be 0 (mean/compact) or 1 (minmax), got {summary_kind}")
    if summary_width:
        ok = (
            summary_width % 16 == 0 and summary_width <= 2 * d
            if summary_kind == 1
            else (summary_width % 8 == 0 and summary_width <= d)
        )
        if not ok:
            raise ValueError(
                f"summary_width must be 0, a multiple of 8 <= D for mean/compact, or 2m (m a multiple of 8, "
                f"m <= D) for minmax; got {summary_width}"
            )


@torch.library.custom_op(
    "mosaickv::encode_into_", mutates_args=("bits", "vals", "summary", "status"), device_types="cuda"
)
def encode_into_(
    x: torch.Tensor,
    token0: int,
    stripe_ids: torch.Tensor,
    stripes: torch.Tensor,
    rot: torch.Tensor,
    which: int,
    bits: torch.Tensor,
    vals: torch.Tensor,
    summary: torch.Tensor | None,
    summary_kind: int,
    n_channels: int,
    block: int,
    status: torch.Tensor,
) -> None:
    """Encode tokens [token0, token0 + n) of one segment, every head, into the layer's pools in place.

    x: [n, H, D] storage dtype (any token/head strides, contiguous D); stripe_ids: [H] int32 rows of
    ``stripes`` ([n_stripes, 13] int64, layout.STRIPE_COLS); rot: [n_stripes, 2, D, D] float32; which:
    0 keys, 1 values; bits: flat int32; vals: flat x.dtype; summary: [n_blocks, width] or None; status:
    [1] int32. For appended decode tokens pass token0 at the start of the last (partial) block.
    """
    _ext.require().encode(
        x,
        token0,
        stripe_ids,
        stripes,
        rot,
        which,
        bits,
        vals,
        summary,
        summary_kind,
        n_channels,
        block,
        status,
    )


@encode_into_.register_fake
def _(
    x, token0, stripe_ids, stripes, rot, which, bits, vals, summary, summary_kind, n_channels, block, status
):
    return None


@torch.library.custom_op(
    "mosaickv::decode_",
    mutates_args=(
        "out",
        "qrot",
        "keys",
        "sel",
        "pieces",
        "n_pieces",
        "part_o",
        "part_ml",
        "stripe_out",
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
    rot: torch.Tensor | None,
    kbits: torch.Tensor,
    vbits: torch.Tensor,
    kvals: torch.Tensor,
    vvals: torch.Tensor,
    summary: torch.Tensor,
    summary_kind: int,
    block: int,
    n_select: torch.Tensor,
    dense_k: torch.Tensor,
    dense_v: torch.Tensor,
    dense_len: torch.Tensor,
    qrot: torch.Tensor,
    keys: torch.Tensor,
    sel: torch.Tensor,
    pieces: torch.Tensor,
    n_pieces: torch.Tensor,
    piece_blocks: int,
    part_o: torch.Tensor,
    part_ml: torch.Tensor,
    stripe_out: torch.Tensor,
    status: torch.Tensor,
) -> None:
    """One decode step of one layer for a batch: q [B, H_q, D] -> out [B, H_q, D] (same dtype).

    Tensors are a ``DecodeLayout`` and a ``DecodeWorkspace`` (mosaickv.ops.layout); ``stages`` is a
    bit mask (1 rotate q, 2 score, 4 select, 8 attend, 16 merge; 31 = all) for timing one stage.
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
        rot,
        kbits,
        vbits,
        kvals,
        vvals,
        summary,
        summary_kind,
        block,
        n_select,
        dense_k,
        dense_v,
        dense_len,
        qrot,
        keys,
        sel,
        pieces,
        n_pieces,
        piece_blocks,
        part_o,
        part_ml,
        stripe_out,
        status,
    )


@decode_.register_fake
def _(*args: object) -> None:  # mutates its workspace arguments only: nothing to describe
    return None


def run_decode(
    layout: DecodeLayout,
    ws: DecodeWorkspace,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    stages: int = STAGE_ALL,
) -> torch.Tensor:
    """``decode_`` over a layout and its workspace: q [B, H_q, D] contiguous -> out [B, H_q, D] (q's
    dtype), written in place and returned. ``ws`` comes from ``DecodeWorkspace.plan(layout, H_q / H_kv)``."""
    decode_(
        q,
        out,
        scale,
        layout.packed,
        stages,
        layout.stripes,
        layout.stripe_ptr,
        layout.block_ptr,
        layout.block_stripe,
        layout.rot,
        layout.kbits,
        layout.vbits,
        layout.kvals,
        layout.vvals,
        layout.summary,
        layout.summary_kind,
        layout.block,
        layout.n_select,
        layout.dense_k,
        layout.dense_v,
        layout.dense_len,
        ws.qrot,
        ws.keys,
        ws.sel,
        ws.pieces,
        ws.n_pieces,
        ws.piece_blocks,
        ws.part_o,
        ws.part_ml,
        ws.stripe_out,
        ws.status,
    )
    return out
