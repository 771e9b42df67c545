"""Block summaries, GQA-shared block scores and the global top-k block selection."""

import math

import torch

SUMMARY_KINDS = ("mean", "minmax", "compact", "compact_minmax")


def summary_width(kind: str, dim: int, compact_channels: int) -> int:
    """Stored values per block: mean D, minmax 2D ([min | max]), compact m, compact_minmax 2m."""
    if kind == "mean":
        return dim
    if kind == "minmax":
        return 2 * dim
    if kind == "compact":
        return compact_channels
    if kind == "compact_minmax":
        return 2 * compact_channels
    raise ValueError(f"summary kind must be one of {SUMMARY_KINDS}, got {kind!r}")


def block_summaries(
    x: torch.Tensor, block: int, kind: str, compact_channels: int, dtype: torch.dtype
) -> torch.Tensor:
    """One summary per block of ``block`` consecutive tokens (the last block may be partial).

    Args:
        x: [H, S, F] float32 keys in summary coordinates (rotated for mosaic).
    Returns:
        [H, ceil(S / block), width] in ``dtype``; minmax rows are [min_0..min_F-1, max_0..max_F-1];
        compact_minmax rows are the same over the first m channels only.
    """
    if kind == "compact_minmax":
        x = x[..., :compact_channels]
    h, s, f = x.shape
    n_b = -(-s // block)
    pad = n_b * block - s
    if kind in ("minmax", "compact_minmax"):
        lo = torch.nn.functional.pad(x, (0, 0, 0, pad), value=math.inf).view(h, n_b, block, f).amin(2)
        hi = torch.nn.functional.pad(x, (0, 0, 0, pad), value=-math.inf).view(h, n_b, block, f).amax(2)
        return torch.cat([lo, hi], dim=-1).to(dtype)
    summary_width(kind, f, compact_channels)
    counts = torch.full((n_b,), float(block), device=x.device)
    counts[-1] = s - (n_b - 1) * block
    mean = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(h, n_b, block, f).sum(2) / counts[:, None]
    if kind == "compact":
        mean = mean[..., :compact_channels]
    return mean.contiguous().to(dtype)


def score_blocks(q: torch.Tensor, summary: torch.Tensor, kind: str) -> torch.Tensor:
    """Score every block with every query head of its GQA group; keep the max over the group.

    Args:
        q: [H, G, F] float32 queries in the summary's coordinates.
        summary: [H, n_b, width] as built by ``block_summaries``.
    Returns:
        [H, n_b] float32. mean/compact: q . summary (compact uses q[..., :m]); minmax and
        compact_minmax: Quest's upper bound sum_j max(q_j min_j, q_j max_j) over the stored channels.
    """
    s = summary.float()
    if kind in ("minmax", "compact_minmax"):
        f = s.shape[-1] // 2
        qf = q[..., :f]
        scores = torch.einsum("hgf,hbf->hgb", qf.clamp(min=0), s[..., f:])
        scores += torch.einsum("hgf,hbf->hgb", qf.clamp(max=0), s[..., :f])
    else:
        scores = torch.einsum("hgf,hbf->hgb", q[..., : s.shape[-1]], s)
    return scores.amax(1)


def select_top_blocks(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top ceil(ratio * N) blocks per KV head over the whole sequence.

    Args:
        scores: [H, N] float32, all blocks of all segments in segment order.
    Returns:
        [H, n_sel] int64 global block ids, ascending.
    """
    n = scores.shape[1]
    n_sel = min(n, math.ceil(ratio * n - 1e-9))  # 0.1 * 30 must give 3, not 4
    return scores.topk(n_sel, dim=1).indices.sort(dim=1).values
