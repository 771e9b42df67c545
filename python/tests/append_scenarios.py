"""Shared by test_ops.py (CPU reference) and test_ops_gpu.py (kernel): stripes of open segments that
receive their tokens over several append steps, and what encoding each whole segment at once gives
(core ``pack_topk`` and ``block_summaries``). Appending must reproduce the whole-segment encode."""

from dataclasses import dataclass

import torch

from mosaickv.core import block_summaries, pack_topk
from mosaickv.ops import AppendPools, append_to_pools

SUMMARY_NAMES = {0: "compact", 1: "compact_minmax"}


@dataclass(frozen=True)
class AppendCase:
    """n stripes (one (layer, request, head) each) with per-stripe keep and g per side; ``steps``: tokens
    appended per stripe at each call (one call carries every stripe: many items per launch)."""

    d: int
    keep_k: tuple[int, ...]
    keep_v: tuple[int, ...]
    group_k: tuple[int, ...]
    group_v: tuple[int, ...]
    steps: tuple[int, ...]
    summary_kind: int  # 0 compact (mean of the first m channels), 1 [min | max] of the first m
    m: int
    channels: int | None = None
    block: int = 8
    split: bool = False  # tell the kernel each call's row length: long rows go over several CTAs

    @property
    def width(self) -> int:
        return self.m if self.summary_kind == 0 else 2 * self.m


def make_inputs(case: AppendCase, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """rot [n, 2, D, D] float32 and the stripes' whole token sequences x_k, x_v [n, S, D] (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    n, s, d = len(case.keep_k), sum(case.steps), case.d
    rot = torch.linalg.qr(torch.randn(n * 2, d, d, generator=gen, dtype=torch.float64))[0].float()
    x_k = (torch.randn(n, s, d, generator=gen) * torch.linspace(2.0, 0.2, d) + 0.3).to(dtype)
    x_v = torch.randn(n, s, d, generator=gen).to(dtype)
    return rot.reshape(n, 2, d, d).contiguous(), x_k, x_v  # qr's Q is column-major


def append_all(
    case: AppendCase, rot: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor, device: str
) -> tuple[AppendPools, int]:
    """Pools (capacity: the whole sequence + 5 rows) filled by one append call per step; returns the
    pools and the status word. The table lists the stripes in reverse order (row order is free)."""
    n, _, d = x_k.shape
    pools = AppendPools.allocate(
        sum(case.steps) + 5,
        rot.to(device),
        list(case.keep_k),
        list(case.keep_v),
        list(case.group_k),
        list(case.group_v),
        summary_kind=case.summary_kind,
        summary_width=case.width,
        block=case.block,
        dtype=x_k.dtype,
        channels=case.channels,
    )
    status = torch.zeros(1, dtype=torch.int32, device=device)
    pos = 0
    for t in case.steps:
        xk = x_k[:, pos : pos + t].contiguous().to(device)  # [n, t, D]: stripe i's tokens at i * t * D
        xv = x_v[:, pos : pos + t].contiguous().to(device)
        rows = torch.tensor([[i, i * t * d, d, t, pos] for i in reversed(range(n))], device=device)
        append_to_pools(pools, xk, xv, rows, status, t if case.split else 0)
        pos += t
    return pools, int(status.item())


def whole_segment(
    case: AppendCase, rot: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor, stripe: int
) -> dict[str, torch.Tensor]:
    """The core encode of stripe ``stripe``'s whole sequence: values/bits per side, key summaries."""
    out = {}
    for which, x, keep, group in ((0, x_k, case.keep_k, case.group_k), (1, x_v, case.keep_v, case.group_v)):
        xr = x[stripe].float() @ rot[stripe, which].T
        vals, bits = pack_topk(xr, keep[stripe], group[stripe], case.channels, x.dtype)
        out[f"vals{which}"], out[f"bits{which}"] = vals, bits.view(torch.int32)
        if which == 0:
            kind = SUMMARY_NAMES[case.summary_kind]
            out["summary"] = block_summaries(xr[None], case.block, kind, case.m, x.dtype)[0]
    return out


def appended_rows(pools: AppendPools, case: AppendCase, stripe: int) -> dict[str, torch.Tensor]:
    """What the appends wrote for ``stripe`` (CPU copies): values (padding included), bits, summaries."""
    s = sum(case.steps)
    out = {}
    for which in (0, 1):
        vals, bits = pools.stripe_rows(which, stripe, 0, s)
        out[f"vals{which}"], out[f"bits{which}"] = vals.cpu(), bits.cpu()
    nb_cap = -(-(s + 5) // case.block)
    assert pools.summary is not None
    out["summary"] = pools.summary[stripe * nb_cap : stripe * nb_cap + -(-s // case.block)].cpu()
    return out
