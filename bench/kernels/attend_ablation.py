"""Where the packed attention loop's time goes, one part at a time: builds of the kernel with one part
of the per-chunk loop removed, each timed on the same layouts (attention stage alone, CUDA-graph
replays, layers cycled through DRAM). The outputs of the ablated builds are wrong by construction;
only their time means something. The difference to the full kernel is what that part costs when
the others still run (parts overlap, so the differences need not add up to the whole).

    python bench/kernels/attend_ablation.py make DEST          # source trees DEST/<variant>/ (no GPU)
    (cd DEST/<variant> && python -m mosaickv.ops.compile)       # build each (in parallel on the H200)
    PYTHONPATH=DEST/<variant>/python python bench/kernels/attend_ablation.py time --label <variant> \
        --out F.json

Variants (edits of cuda/mosaickv/attention.cuh, each must match once):
    full        the kernel as it is
    one_walk    the expansion with one walk per row (the fast path before two walks)
    no_mask     the mma fragments are not masked with the rows' bitmap bits (the tiles keep what
                earlier rows left: the thirteenth session's replacement for zeroing them)
    no_expand   the packed rows are loaded but not expanded (a check on them keeps the loads)
    no_flash    no tensor-core attention on the tiles (logits, softmax, P.V)
    no_load     rows made up in registers once per lane instead of loaded (random positions, 32 kept)
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL = Path("cuda/mosaickv/attention.cuh")

LOAD_CUR = "if (rc.blk >= 0) cur.load(bits_of(rc), n_words, vals_of(rc), keep);"
LOAD_NXT = "if (rn.blk >= 0) nxt.load(bits_of(rn), n_words, vals_of(rn), keep);"
EXPAND = "if (rc.blk >= 0) cur.expand(vals_of(rc), keep, grp, my_row);"
# A row of 8 random positions per bitmap word, distinct per lane, built once.
MADE_UP_ROW = """PackedRow<T> made_up{};
      {
        uint32_t hash = 0x9e3779b9u * (threadIdx.x + 1) + 0x85ebca6bu * blockIdx.x;
        for (int i = 0; i < 4; ++i)
          while (__popc(made_up.w[i]) < 8) {
            hash = hash * 1664525u + 1013904223u;
            made_up.w[i] |= 1u << (hash >> 27);
          }
        for (int c = 0; c < 4; ++c) made_up.pre[c] = make_uint4(hash, hash + c, hash ^ c, hash + 7 * c);
      }
      PackedRow<T> cur{}, nxt{};"""

VARIANTS: dict[str, list[tuple[str, str]]] = {
    "full": [],
    "one_walk": [
        (
            "if (g == 1 && (keep == 32 || keep == 16) && (nz & (nz + 1)) == 0) {",
            "if (false) {",
        )
    ],
    "no_mask": [
        (
            'asm("prmt.b32 %0, %1, %2, %3;" : "=r"(m) : "r"(lo), "r"(hi), "r"(sel));\n  return m;',
            "return ~0u;",
        )
    ],
    "no_expand": [
        (
            EXPAND,
            (
                "if (rc.blk >= 0 && (cur.w[0] ^ cur.w[3] ^ cur.pre[0].x ^ cur.pre[3].w) == 0x9e3779b9u)"
                " my_row[0] = T{};"
            ),
        )
    ],
    "no_flash": [
        (
            (
                "        __syncwarp();\n        flash_chunk<T, D, G>(ktile, vtile, valid, s_qa + lane, s_bits[warp], st);\n"
                "        __syncwarp();\n        cur = nxt;"
            ),
            "        __syncwarp();\n        (void)valid;\n        cur = nxt;",
        )
    ],
    "no_load": [
        ("PackedRow<T> cur{}, nxt{};", MADE_UP_ROW),
        (LOAD_CUR, "if (rc.blk >= 0) cur = made_up;"),
        (LOAD_NXT, "if (rn.blk >= 0) nxt = made_up;"),
    ],
}

# (context, batch): a full GPU at 1M and 128K, and the batch-1 case.
CASES = ((1048576, 1), (1048576, 8), (131072, 8))


def make(dest: Path) -> None:
    """One source tree per variant under dest: python/mosaickv (no build), cuda/, bench/kernels/."""
    source = (ROOT / KERNEL).read_text()
    for name, edits in VARIANTS.items():
        tree = dest / name
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(ROOT / "cuda", tree / "cuda")
        shutil.copytree(
            ROOT / "python/mosaickv",
            tree / "python/mosaickv",
            ignore=shutil.ignore_patterns("build", "__pycache__"),
        )
        shutil.copytree(
            ROOT / "bench/kernels",
            tree / "bench/kernels",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        text = source
        for old, new in edits:
            if text.count(old) != 1:
                sys.exit(
                    f"variant {name}: an edit's text occurs {text.count(old)} times in {KERNEL}, not once"
                )
            text = text.replace(old, new)
        (tree / KERNEL).write_text(text)
        print(f"{name}: {tree}")


def time_variant(label: str, out: Path, repeats: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attend_probe import selected_layers
    from bench_kernels import time_cycle
    from mosaickv.ops import STAGE_ALL

    torch.manual_seed(0)
    rows = []
    for ctx, batch in CASES:
        sel = selected_layers(batch, ctx)
        attend = time_cycle(sel.calls(8), repeats)
        whole = time_cycle(sel.calls(STAGE_ALL), repeats)
        rows.append(
            {
                "context": ctx,
                "batch": batch,
                "tokens": sel.tokens,
                "attend_us": attend * 1e3,
                "whole_us": whole * 1e3,
            }
        )
        print(
            f"{label:>10} {ctx:>8} b{batch}: attend {attend * 1e3:8.1f} us, whole call {whole * 1e3:8.1f} us",
            flush=True,
        )
        del sel
        torch.cuda.empty_cache()
    doc = {"variant": label, "gpu": torch.cuda.get_device_name(), "cases": rows}
    out.write_text(json.dumps(doc, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write the variants' source trees")
    mk.add_argument("dest", type=Path)
    tm = sub.add_parser("time", help="time the mosaickv build on PYTHONPATH")
    tm.add_argument("--label", required=True)
    tm.add_argument("--out", type=Path, required=True)
    tm.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.dest)
    else:
        time_variant(args.label, args.out, args.repeats)


if __name__ == "__main__":
    main()
