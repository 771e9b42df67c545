"""Per-segment strategy search: the most compressive (keep, group, truncation) under a loss threshold.

Loss = relative energy not kept, sum ||x - keep(Rx)||^2 / sum ||x||^2 over the segment; a rotation
preserves norms, so it is computed on the rotated vectors directly.
"""

from dataclasses import dataclass

import torch

from mosaickv.core.packing import bitmap_words, check_group

DEFAULT_KEEP_RATIOS = (0.125, 0.1875, 0.25, 0.375, 0.5, 0.75)


@dataclass(frozen=True)
class Strategy:
    """How one stripe (segment x head x K-or-V) is packed.

    keep: kept elements per vector (multiple of ``group``); group: g; channels: truncation c or None.
    """

    keep: int
    group: int
    channels: int | None = None

    def bytes_per_vector(self, dim: int, elem_bytes: int) -> int:
        """Stored bytes per token: packed values plus the bitmap row."""
        return self.keep * elem_bytes + 4 * bitmap_words(dim, self.group)


def fixed_strategy(dim: int, keep_ratio: float, group: int, channels: int | None) -> Strategy:
    """keep = round(keep_ratio * D) rounded to a multiple of g (at least g)."""
    check_group(dim, group)
    limit = dim if channels is None else channels
    if limit % group or not 0 < limit <= dim:
        raise ValueError(f"channels must be a multiple of g = {group} in (0, {dim}], got {channels}")
    keep = max(group, round(keep_ratio * dim / group) * group)
    return Strategy(min(keep, limit - limit % group), group, channels)


def candidate_strategies(
    dim: int, keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS, groups: tuple[int, ...] = (1, 2, 4)
) -> list[Strategy]:
    """Every (keep ratio x group) pair, deduplicated, without truncation."""
    found = {fixed_strategy(dim, r, g, None) for r in keep_ratios for g in groups if dim % g == 0}
    return sorted(found, key=lambda s: (s.keep, s.group))


def energy_losses(x: torch.Tensor, strategies: list[Strategy]) -> torch.Tensor:
    """Relative energy not kept by each strategy.

    Args:
        x: [S, D] float32, rotated vectors of one head.
    Returns:
        [len(strategies)] float64 losses in [0, 1].
    """
    s, d = x.shape
    total = x.double().pow(2).sum()
    losses = torch.zeros(len(strategies), dtype=torch.float64)
    if float(total) == 0.0:
        return losses
    cumulative: dict[tuple[int, int | None], torch.Tensor] = {}
    for i, st in enumerate(strategies):
        key = (st.group, st.channels)
        if key not in cumulative:
            energy = x.double().view(s, d // st.group, st.group).pow(2).sum(-1)
            if st.channels is not None:
                energy = energy[:, : st.channels // st.group]
            cumulative[key] = energy.sort(dim=1, descending=True).values.cumsum(1).sum(0)
        kept = cumulative[key][st.keep // st.group - 1]
        losses[i] = (1.0 - kept / total).clamp(min=0.0)
    return losses


def dropped_energy(x: torch.Tensor, strategies: list[Strategy]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy each head's strategy drops, and each head's total, for all heads at once.

    Args:
        x: [H, S, D] float32, rotated vectors of H heads.
        strategies: one per head.
    Returns:
        (dropped, total): [H] float64; dropped[h] / total[h] is ``energy_losses(x[h], [strategies[h]])``.
    """
    n_heads, s, d = x.shape
    xd = x.double()
    total = xd.pow(2).sum((1, 2))
    kept = torch.zeros_like(total)
    by_shape: dict[tuple[int, int | None], list[int]] = {}
    for h, st in enumerate(strategies):
        by_shape.setdefault((st.group, st.channels), []).append(h)
    for (g, channels), heads in by_shape.items():  # one sort per distinct (group, truncation)
        index = torch.tensor(heads, device=x.device)
        energy = xd.index_select(0, index).view(len(heads), s, d // g, g).pow(2).sum(-1)
        if channels is not None:
            energy = energy[..., : channels // g]
        best_first = energy.sort(dim=-1, descending=True).values.cumsum(-1)  # [h, S, D/g]
        last = torch.tensor([strategies[h].keep // g - 1 for h in heads], device=x.device)
        kept[index] = best_first.gather(-1, last.view(-1, 1, 1).expand(-1, s, 1)).sum((1, 2))
    return (total - kept).clamp(min=0.0), total


def search_strategy(
    x: torch.Tensor, candidates: list[Strategy], threshold: float, elem_bytes: int
) -> tuple[Strategy, float]:
    """Most compressive candidate with loss <= threshold; if none qualifies, the lowest-loss one.

    Args:
        x: [S, D] float32, rotated vectors of one head.
    Returns:
        (strategy, its loss).
    """
    if not candidates:
        raise ValueError("strategy search needs at least one candidate")
    d = x.shape[1]
    losses = energy_losses(x, candidates)
    sizes = [c.bytes_per_vector(d, elem_bytes) for c in candidates]
    ok = [i for i in range(len(candidates)) if float(losses[i]) <= threshold]
    best = min(ok, key=lambda i: (sizes[i], float(losses[i]))) if ok else int(losses.argmin())
    return candidates[best], float(losses[best])
