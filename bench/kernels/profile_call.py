"""One MosaicKV decode call (compact-16, the benchmark's shapes) to run under Nsight Compute: a
warm-up call, then `--calls` more between cudaProfilerStart and cudaProfilerStop, e.g.

    ncu --clock-control none --set full --import-source yes --profile-from-start off \
        -o prof python bench/kernels/profile_call.py --batch 1 --context 1048576

Several layers are built and cycled so that, as in the benchmark, a profiled call does not find its
data in L2.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attend_probe import selected_layers
from mosaickv.ops import STAGE_ALL


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument(
        "--calls",
        type=int,
        default=2,
        help="calls after the warm-up, each on the next layer",
    )
    args = ap.parse_args()
    layers = selected_layers(args.batch, args.context, min_layers=args.calls + 1)
    calls = layers.calls(STAGE_ALL)
    # Warm up on the last layer: the first profiled call's data is then not in L2.
    calls[-1]()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls[: args.calls]:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {args.calls} calls: batch {args.batch}, context {args.context}")
    print(f"{layers.tokens} selected tokens per call")


if __name__ == "__main__":
    main()
