"""Where the attention stage's time goes: the same attend call (stage 8 only, CUDA-graph replays) on
data that stays in the 60 MB L2 (one layer, replayed) and on data that does not (layers cycled so the
bytes read exceed the L2 four times). A large gap means the stage waits on DRAM; a small one means it
is bound by its own instructions and dependency chains.

    python bench/kernels/attend_probe.py
"""

import sys
from pathlib import Path

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
from mosaickv.ops import STAGE_ALL, DecodeWorkspace, run_decode


def main() -> None:
    torch.manual_seed(0)
    print(
        "context batch  selected_tokens  MB_read  attend_L2_us  attend_DRAM_us  (DRAM: layers)"
    )
    for ctx, batch in ((32768, 4), (32768, 8), (131072, 2), (1048576, 1)):
        lays = [synth_mosaic(batch, ctx, 0, 16)]
        tokens = int(lays[0].n_select.sum()) * BLOCK
        nbytes = tokens * 2 * (KEEP * 2 + 16)
        n = max(2, layers_for(nbytes))
        lays += [synth_mosaic(batch, ctx, 0, 16) for _ in range(n - 1)]
        wss = [DecodeWorkspace.plan(lay, G, piece_blocks=64) for lay in lays]
        q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for lay, ws in zip(
            lays, wss, strict=True
        ):  # selection and pieces for the attend-only calls
            run_decode(lay, ws, q, out, D**-0.5, STAGE_ALL)
        l2 = time_cycle([runner(lays[0], wss[0], q, out, 8)], 50)
        dram = time_cycle(
            [runner(lay, ws, q, out, 8) for lay, ws in zip(lays, wss, strict=True)], 30
        )
        print(
            f"{ctx:>8} {batch:>4} {tokens:>14} {nbytes / 1e6:9.1f} {l2 * 1e3:12.1f} {dram * 1e3:14.1f}  ({n})",
            flush=True,
        )
        del lays, wss
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
