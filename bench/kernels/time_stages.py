"""MosaicKV alone (compact-16 summaries, or --summary cminmax16 / minmax), for A/B runs of kernel changes on
one lease: the whole layer call and each stage alone (µs, CUDA-graph replays, layers cycled through
DRAM: the method of bench_kernels.py without its baselines). Appends one labelled record per run to
--out.

    python bench/kernels/time_stages.py --label base --out ab.json [--piece-blocks 32] [--without]

--piece-blocks defaults to the workspace's own choice (DecodeWorkspace.plan, auto_piece_blocks).
--without also times the whole call with each stage left out ("without_<stage>"): the whole call
minus that is what the stage adds to the call's critical path, which a stage timed alone overstates
when it overlaps its neighbours. (Left-out stages leave their outputs from the call before, so the
stages that run read valid data.)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (
    DEV,
    DT,
    H_Q,
    MOSAIC_SUMMARIES,
    STAGES,
    D,
    mosaic_layers,
    runner,
    stage_times,
    time_cycle,
)
from mosaickv.ops import STAGE_ALL


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--piece-blocks", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--summary", choices=sorted(MOSAIC_SUMMARIES), default="compact16")
    ap.add_argument(
        "--without", action="store_true", help="also time the call without each stage"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for t in args.contexts:
        for batch in args.batches:
            q = torch.randn(batch, H_Q, D, device=DEV, dtype=DT)
            out = torch.empty_like(q)
            lays, wss, _ = mosaic_layers(
                batch, t, *MOSAIC_SUMMARIES[args.summary], args.piece_blocks
            )
            whole = time_cycle(
                [
                    runner(lay, w, q, out, STAGE_ALL)
                    for lay, w in zip(lays, wss, strict=True)
                ],
                args.repeats,
            )
            stages = stage_times(lays, wss, q, out, args.repeats)
            if args.without:
                stages |= {
                    f"without_{label}": time_cycle(
                        [
                            runner(lay, w, q, out, STAGE_ALL & ~mask)
                            for lay, w in zip(lays, wss, strict=True)
                        ],
                        args.repeats,
                    )
                    for label, mask in STAGES
                }
            if int(wss[0].status.item()) != 0:
                raise SystemExit(
                    f"kernel status {int(wss[0].status.item())} at T={t} B={batch}"
                )
            rows.append(
                {
                    "context": t,
                    "batch": batch,
                    "piece_blocks": wss[0].piece_blocks,
                    "whole_us": whole * 1e3,
                    **{k: v * 1e3 for k, v in stages.items()},
                }
            )
            print(
                f"{args.label:<12} T={t:>8} B={batch} pieces {wss[0].piece_blocks}: whole {whole * 1e3:7.1f} us | "
                + " ".join(f"{k} {v * 1e3:6.1f}" for k, v in stages.items()),
                flush=True,
            )
            del lays, wss
            torch.cuda.empty_cache()
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    runs.append(
        {
            "label": args.label,
            "piece_blocks": args.piece_blocks,  # None: each row's own choice (auto_piece_blocks)
            "summary": args.summary,
            "device": torch.cuda.get_device_name(),
            "rows": rows,
        }
    )
    args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
