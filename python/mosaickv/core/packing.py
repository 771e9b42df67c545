"""Per-vector top-r element selection in groups of g, stored as packed values plus a uint32 bitmap.

Bitmap convention (docs/FORMAT.md): row t has W = ceil(D / g / 32) uint32 words; bit j of word w
is set iff group i = 32 w + j is kept; group i covers rotated positions [i g, i g + g). Kept values
are stored in ascending position order. torch has no shifts on uint32, so bit arithmetic runs on
int64 and only the stored tensor is uint32.
"""

import torch

_BIT = torch.arange(32, dtype=torch.int64)


def bitmap_words(dim: int, group: int) -> int:
    """W, the number of uint32 words per bitmap row."""
    return -(-dim // group // 32)


def check_group(dim: int, group: int) -> None:
    if group not in (1, 2, 4):
        raise ValueError(f"group size g must be 1, 2 or 4, got {group}")
    if dim % group:
        raise ValueError(f"head dim D = {dim} must be a multiple of the group size g = {group}")


def groups_to_bitmap(groups: torch.Tensor) -> torch.Tensor:
    """[S, n_groups] bool -> [S, W] uint32."""
    s, n = groups.shape
    w = -(-n // 32)
    padded = torch.zeros(s, w * 32, dtype=torch.int64, device=groups.device)
    padded[:, :n] = groups.to(torch.int64)
    words = (padded.view(s, w, 32) << _BIT.to(groups.device)).sum(-1)
    return words.to(torch.uint32)


def unpack_bitmap(bitmap: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Positions kept per row.

    Args:
        bitmap: [S, W] uint32.
    Returns:
        [S, D] bool, True at every rotated position covered by a set bit.
    """
    s, w = bitmap.shape
    bits = (bitmap.to(torch.int64).unsqueeze(-1) >> _BIT.to(bitmap.device)) & 1
    groups = bits.view(s, w * 32)[:, : dim // group].bool()
    return groups.repeat_interleave(group, dim=1)


def popcount(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits per row: [S, W] uint32 -> [S] int64."""
    bits = (bitmap.to(torch.int64).unsqueeze(-1) >> _BIT.to(bitmap.device)) & 1
    return bits.sum((-1, -2))


def bitmap_positions(bitmap: torch.Tensor, dim: int, group: int, keep: int) -> torch.Tensor:
    """Ascending kept positions per row: [S, W] uint32 -> [S, keep] int64.

    Every row must hold exactly ``keep`` positions (popcount * g == keep), which packing guarantees.
    """
    mask = unpack_bitmap(bitmap, dim, group)
    return mask.nonzero()[:, 1].view(bitmap.shape[0], keep)


def pack_topk(
    x: torch.Tensor,
    keep: int,
    group: int,
    channels: int | None,
    dtype: torch.dtype,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's ``keep / group`` highest-energy groups among the first ``channels`` positions.

    Args:
        x: [S, D] float32, rotated vectors of one head.
        keep: kept elements per row, a multiple of ``group``, <= channels.
        group: g in {1, 2, 4}.
        channels: truncation c (a multiple of g) or None for all D.
        dtype: storage dtype of the values.
        weight: optional [D] float32 w^2 per position: energy is x^2 w^2, the expected squared error a
            dropped element adds to q . x when E[q_i^2] = w_i^2 (query-weighted selection).
    Returns:
        values: [S, keep] ``dtype``, kept elements in ascending position order.
        bitmap: [S, W] uint32.
    """
    s, d = x.shape
    limit = d if channels is None else channels
    check_group(d, group)
    if keep % group or not 0 < keep <= limit or limit % group:
        raise ValueError(
            f"keep = {keep} must be a positive multiple of g = {group} and <= channels = {limit}")
    sq = x.float().pow(2) if weight is None else x.float().pow(2) * weight
    energy = sq.view(s, d // group, group).sum(-1)
    if limit < d:
        energy[:, limit // group :] = -1.0
    top = energy.topk(keep // group, dim=1).indices.sort(dim=1).values
    groups = torch.zeros(s, d // group, dtype=torch.bool, device=x.device)
    groups.scatter_(1, top, True)
    # a gather, not x[mask]: boolean indexing waits for the device to count the mask
    positions = (top.unsqueeze(-1) * group + torch.arange(group, device=x.device)).view(s, keep)
    values = x.gather(1, positions).to(dtype)
    return values, groups_to_bitmap(groups)


def unpack_values(values: torch.Tensor, bitmap: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Reference decompression for tests and analysis (PackedAttention never calls it).

    Args:
        values: [S, k] storage dtype; bitmap: [S, W] uint32.
    Returns:
        [S, D] in ``values.dtype``, zeros at positions not kept.
    """
    mask = unpack_bitmap(bitmap, dim, group)
    out = torch.zeros(values.shape[0], dim, dtype=values.dtype, device=values.device)
    out[mask] = values.reshape(-1)
    return out
