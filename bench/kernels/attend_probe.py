"""Where the attention stage's time goes: the same attend call (stage 8 only, CUDA-graph replays) on
data that stays in the 60 MB L2 (one layer, replayed) and on data that does not (layers cycled so the
bytes read exceed the L2 four times). A large gap means the stage waits on DRAM; a small one means it
is bound by its own instructions and dependency chains.

    python bench/kernels/attend_probe.py
"""

import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (
    BLOCK,
    H_Q,
    KEEP,
    D,
    G,
    layers_for,
    runner,
    synth_mosaic,
    time_cycle,
)
from mosaickv.ops import STAGE_ALL, DecodeLayout, DecodeWorkspace, run_decode


class SelectedLayers(NamedTuple):
    """Compact-16 layers with their selection made, for attend-only (stage 8) calls."""

    layouts: list[DecodeLayout]
    workspaces: list[DecodeWorkspace]
    q: torch.Tensor
    out: torch.Tensor
    tokens: int  # selected tokens of one layer
    bytes_read: int  # packed K and V bytes one attend call reads

    def calls(self, stages: int, layers: int | None = None) -> list:
        pairs = list(zip(self.layouts, self.workspaces, strict=True))[:layers]
        return [runner(lay, ws, self.q, self.out, stages) for lay, ws in pairs]


def selected_layers(batch: int, ctx: int, min_layers: int = 1) -> SelectedLayers:
    """Enough layers at (batch, ctx) that cycling through them reads 4x the L2 (at least
    min_layers), each decoded once in full so that its selection and pieces are in place."""
    first = synth_mosaic(batch, ctx, 0, 16)
    tokens = int(first.n_select.sum()) * BLOCK
    nbytes = tokens * 2 * (KEEP * 2 + 16)
    n = max(min_layers, layers_for(nbytes))
    lays = [first] + [synth_mosaic(batch, ctx, 0, 16) for _ in range(n - 1)]
    wss = [DecodeWorkspace.plan(lay, G) for lay in lays]
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for lay, ws in zip(lays, wss, strict=True):
        run_decode(lay, ws, q, out, D**-0.5, STAGE_ALL)
    return SelectedLayers(lays, wss, q, out, tokens, nbytes)


def main() -> None:
    torch.manual_seed(0)
    print(
        "context batch  selected_tokens  MB_read  attend_L2_us  attend_DRAM_us  (DRAM: layers)"
    )
    for ctx, batch in ((32768, 4), (32768, 8), (131072, 2), (1048576, 1)):
        sel = selected_layers(batch, ctx, min_layers=2)
        l2 = time_cycle(sel.calls(8, layers=1), 50)
        dram = time_cycle(sel.calls(8), 30)
        print(
            f"{ctx:>8} {batch:>4} {sel.tokens:>14} {sel.bytes_read / 1e6:9.1f} {l2 * 1e3:12.1f}"
            f" {dram * 1e3:14.1f}  ({len(sel.layouts)})",
            flush=True,
        )
        del sel
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
