"""Kernel benchmark on one GPU: Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, d = 128),
bf16, keep ratio 0.25, token ratio 0.10, block 8, 4 sinks + 64-token window, 64K-token segments.

Side by side in one run, per layer call (decode, one query token per sequence):
  sdpa_cudnn / sdpa_flash   full attention (GQA as [B, H_kv, G, D] queries over [B, H_kv, T, D])
  dense_select              our dense token-selection kernel (Quest min/max scoring + same select, the
                            same tensor-core attention kernel over rows copied instead of expanded)
  mosaic_compact16          MosaicKV end to end (rotate q, score compact-16 summaries, select, attend)
  mosaic_cminmax16          MosaicKV with min/max of the first 16 rotated channels (core default)
  mosaic_minmax             MosaicKV with Quest-style min/max summaries over all D rotated channels
plus a stage breakdown, encode throughput, and the per-step cost of encoding appended tokens: the
old per-layer append (encode_into_, K and V launches per request, re-encoding the partial block),
the new append per layer (append_encode_, one launch, one new token per stripe) and the new append
batched over all 32 layers of a step in one launch, each against the 128K decode step of 32 layers
(32 x one layer call, measured in the same run). ``--sections append`` runs only that part.
Caches are synthesised on the GPU at the right sizes (speed does not depend on values; selection
scores are random, so the selected set is as spread as it gets). Each timed call cycles over enough
distinct layers that the bytes read exceed the L2 cache several times over.

    python bench/kernels/bench_kernels.py --out bench/results/kernels-h200.json
    python bench/kernels/bench_kernels.py --sections append --out bench/results/append-h200.json
"""

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaickv.ops import (
    STAGE_ALL,
    AppendPools,
    DecodeLayout,
    DecodeWorkspace,
    FlatPools,
    append_to_pools,
    encode_into_,
    n_select,
    paged_tables,
    run_decode,
)
from timing import copy_bandwidth_gbs, graph_time_ms

H_Q, H_KV, D, G = 32, 8, 128, 4
N_LAYERS = 32  # Llama-3.1-8B: a decode step runs every layer once
KEEP, BLOCK, RATIO, N_SINK, WINDOW, SEG_LEN = 32, 8, 0.10, 4, 64, 65536
DT = torch.bfloat16
# MosaicKV's summaries in the benchmark: name -> (summary kind, width); method "mosaic_<name>".
MOSAIC_SUMMARIES = {"compact16": (0, 16), "cminmax16": (1, 32), "minmax": (1, 2 * D)}
L2_BYTES = 60 << 20
DEV = "cuda"


def synth_mosaic(batch: int, t: int, summary_kind: int, width: int) -> DecodeLayout:
    """A MosaicKV layer of random content at the benchmark's sizes (see DecodeLayout.synthetic)."""
    return DecodeLayout.synthetic(
        batch,
        H_KV,
        D,
        t,
        keep=KEEP,
        block=BLOCK,
        token_ratio=RATIO,
        n_sink=N_SINK,
        window=WINDOW,
        segment_len=SEG_LEN,
        summary_kind=summary_kind,
        summary_width=width,
        dtype=DT,
        device=DEV,
    )


def synth_dense_select(k: torch.Tensor, v: torch.Tensor) -> DecodeLayout:
    """Quest-style layout over full dense K/V [B, H_kv, T, D]: one stripe per (b, h) of the compressed span."""
    batch, _, t, _ = k.shape
    n_comp = t - N_SINK - WINDOW
    nb = -(-n_comp // BLOCK)
    rows = [
        [
            b,
            h,
            n_comp,
            D,
            D,
            1,
            1,
            0,
            0,
            0,
            0,
            (b * H_KV + h) * nb,
            (b * H_KV + h) * t + N_SINK,
        ]
        for b in range(batch)
        for h in range(H_KV)
    ]
    bh = batch * H_KV
    i32 = torch.int32
    flat = FlatPools(
        rows=torch.tensor(rows, dtype=torch.int64, device=DEV),
        rot=None,
        kbits=torch.zeros(8, dtype=i32, device=DEV),
        vbits=torch.zeros(8, dtype=i32, device=DEV),
        kvals=k.view(-1, D),
        vvals=v.view(-1, D),
        summary=torch.randn(bh * nb, 2 * D, device=DEV, dtype=DT),
    )
    return DecodeLayout.from_flat(
        flat,
        packed=False,
        stripe_ptr=list(range(bh + 1)),
        block_ptr=[i * nb for i in range(bh + 1)],
        block_stripe=[i for i in range(bh) for _ in range(nb)],
        n_select=[n_select(nb, RATIO)] * bh,
        summary_kind=1,
        block=BLOCK,
        dense_k=torch.randn(batch, H_KV, N_SINK + WINDOW, D, device=DEV, dtype=DT),
        dense_v=torch.randn(batch, H_KV, N_SINK + WINDOW, D, device=DEV, dtype=DT),
        dense_len=torch.full((batch,), N_SINK + WINDOW, dtype=i32, device=DEV),
    )


def mosaic_layers(
    batch: int, t: int, kind: int, width: int, piece_blocks: int | None = None
) -> tuple[list[DecodeLayout], list[DecodeWorkspace], int]:
    """Enough distinct synthetic MosaicKV layers that one timed cycle reads > 4x the L2 cache, their
    workspaces, and the bytes one layer call must read."""
    probe = synth_mosaic(batch, t, kind, width)
    rb = bytes_read(probe, 2 * (KEEP * 2 + 16))
    lays = [probe] + [
        synth_mosaic(batch, t, kind, width) for _ in range(layers_for(rb) - 1)
    ]
    return (
        lays,
        [DecodeWorkspace.plan(lay, G, piece_blocks=piece_blocks) for lay in lays],
        rb,
    )


def runner(
    lay: DecodeLayout,
    ws: DecodeWorkspace,
    q: torch.Tensor,
    out: torch.Tensor,
    stages: int,
) -> Callable[[], object]:
    return lambda: run_decode(lay, ws, q, out, D**-0.5, stages)


def bytes_read(lay: DecodeLayout, packed_row_bytes: int) -> int:
    """Fewest bytes one decode call must read: summaries, selected rows, dense part, rotations, q."""
    n_sel = int(lay.n_select.sum())
    flat = lay.flat
    assert flat is not None, "bytes_read counts the flat pools of a synthetic layout"
    summ = flat.summary.shape[0] * flat.summary.shape[1] * 2
    dense = lay.batch * H_KV * (N_SINK + WINDOW) * D * 2 * 2
    rot = (
        0 if flat.rot is None else lay.stripes.shape[0] * 2 * D * D * 4
    )  # R_K for q, R_V for the output
    return (
        summ
        + n_sel * BLOCK * packed_row_bytes
        + dense
        + rot
        + lay.batch * H_Q * D * 2 * 2
    )


def time_cycle(calls: list, repeats: int) -> float:
    """Time one call, cycling over the distinct layers in `calls` (one graph holds all of them)."""
    idx = [0]

    def step() -> None:
        calls[idx[0] % len(calls)]()
        idx[0] += 1

    return graph_time_ms(step, repeats, calls_per_graph=len(calls))


def layers_for(read_bytes: int) -> int:
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(read_bytes, 1))))


STAGES = (("rotate_q", 1), ("score", 2), ("select", 4), ("attend", 8), ("merge", 16))


def stage_times(
    lays: list[DecodeLayout],
    wss: list[DecodeWorkspace],
    q: torch.Tensor,
    out: torch.Tensor,
    repeats: int,
) -> dict[str, float]:
    """Milliseconds per layer call of each stage alone (the others not run), cycling the layers."""
    return {
        label: time_cycle(
            [runner(lay, w, q, out, mask) for lay, w in zip(lays, wss, strict=True)],
            repeats,
        )
        for label, mask in STAGES
    }


def bench_decode(
    contexts: list[int], batches: list[int], repeats: int, copy_bw: float
) -> tuple[list, list]:
    rows, stages_rows = [], []
    for t in contexts:
        for batch in batches:
            q = torch.randn(batch, H_Q, D, device=DEV, dtype=DT)
            out = torch.empty_like(q)
            res: dict[str, tuple[float, int]] = {}
            # Full attention: [B, H_kv, G, D] queries (GQA rows) over [B, H_kv, T, D].
            full_bytes = batch * H_KV * t * D * 2 * 2
            n_full = layers_for(full_bytes)
            kvs = [
                (
                    torch.randn(batch, H_KV, t, D, device=DEV, dtype=DT),
                    torch.randn(batch, H_KV, t, D, device=DEV, dtype=DT),
                )
                for _ in range(n_full)
            ]
            qg = q.view(batch, H_KV, G, D)
            for name, backend in (
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ):
                try:
                    with sdpa_kernel([backend]):
                        calls = [
                            lambda k=k, v=v, qg=qg: F.scaled_dot_product_attention(
                                qg, k, v
                            )
                            for k, v in kvs
                        ]
                        res[name] = (time_cycle(calls, repeats), full_bytes)
                except RuntimeError as err:
                    print(
                        f"  {name} T={t} B={batch}: not run ({str(err).splitlines()[0][:100]})"
                    )
            # Dense token selection over the same dense K/V.
            dlays = [synth_dense_select(k, v) for k, v in kvs]
            dws = [DecodeWorkspace.plan(lay, G, piece_blocks=64) for lay in dlays]
            dcalls = [
                runner(lay, w, q, out, STAGE_ALL)
                for lay, w in zip(dlays, dws, strict=True)
            ]
            res["dense_select"] = (
                time_cycle(dcalls, repeats),
                bytes_read(dlays[0], 2 * D * 2),
            )
            dense_attend = time_cycle(
                [
                    runner(lay, w, q, out, 8 | 16)
                    for lay, w in zip(dlays, dws, strict=True)
                ],
                repeats,
            )
            del kvs, dlays, dws, dcalls
            for summary, (kind, width) in MOSAIC_SUMMARIES.items():
                name = f"mosaic_{summary}"
                lays, wss, rb = mosaic_layers(batch, t, kind, width)
                res[name] = (
                    time_cycle(
                        [
                            runner(lay, w, q, out, STAGE_ALL)
                            for lay, w in zip(lays, wss, strict=True)
                        ],
                        repeats,
                    ),
                    rb,
                )
                if name == "mosaic_compact16":
                    stage = stage_times(lays, wss, q, out, repeats)
                    stage["dense_select_attend_merge"] = dense_attend
                    stages_rows.append({"context": t, "batch": batch, "ms": stage})
                    assert int(wss[0].status.item()) == 0, "kernel status set"
                del lays, wss
                torch.cuda.empty_cache()
            fastest_full = (
                min(v[0] for k, v in res.items() if k.startswith("sdpa"))
                if any(k.startswith("sdpa") for k in res)
                else float("nan")
            )
            for name, (ms, nbytes) in res.items():
                bw = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        "context": t,
                        "batch": batch,
                        "method": name,
                        "ms": ms,
                        "bytes": nbytes,
                        "bw_gbs": bw,
                        "bw_frac_of_copy": bw / copy_bw,
                        "speedup_vs_fastest_full": fastest_full / ms,
                        "speedup_vs_dense_select": res["dense_select"][0] / ms,
                    }
                )
                print(
                    f"  T={t:>8} B={batch} {name:<18} {ms * 1e3:9.1f} us  {bw:7.0f} GB/s "
                    f"({bw / copy_bw:4.0%})  x{fastest_full / ms:5.1f} vs full",
                    flush=True,
                )
            torch.cuda.empty_cache()
    return rows, stages_rows


def bench_encode(repeats: int) -> dict:
    """Prompt encode of one 64K-token segment (8 heads, K with compact-16 summaries, and V), and the
    per-step append encode: the partial block (up to 7 tokens) plus the new token, K and V, batch 1."""
    result = {}
    for label, n_tok, token0 in (
        ("prompt_segment_64k", SEG_LEN, 0),
        ("append_step", BLOCK, SEG_LEN - BLOCK),
    ):
        rows = [
            [
                0,
                h,
                SEG_LEN,
                KEEP,
                KEEP,
                1,
                1,
                h * SEG_LEN * 4,
                h * SEG_LEN * 4,
                h * SEG_LEN * KEEP,
                h * SEG_LEN * KEEP,
                h * (SEG_LEN // BLOCK),
                0,
            ]
            for h in range(H_KV)
        ]
        rot = (
            torch.linalg.qr(torch.randn(H_KV * 2, D, D, device=DEV))[0]
            .view(H_KV, 2, D, D)
            .contiguous()
        )
        ids = torch.arange(H_KV, dtype=torch.int32, device=DEV)
        bits = torch.empty(H_KV * SEG_LEN * 4, dtype=torch.int32, device=DEV)
        vals = torch.empty(H_KV * SEG_LEN * KEEP, dtype=DT, device=DEV)
        vb, vv = torch.empty_like(bits), torch.empty_like(vals)
        summ = torch.empty(H_KV * SEG_LEN // BLOCK, 16, dtype=DT, device=DEV)
        stripes, pages = paged_tables(
            FlatPools(torch.tensor(rows), rot, bits, vb, vals, vv, summ)
        )
        status = torch.zeros(1, dtype=torch.int32, device=DEV)
        k = torch.randn(n_tok, H_KV, D, device=DEV, dtype=DT)
        v = torch.randn(n_tok, H_KV, D, device=DEV, dtype=DT)

        def call(
            k=k,
            v=v,
            token0=token0,
            stripes=stripes,
            pages=pages,
            ids=ids,
            status=status,
        ) -> None:
            encode_into_(k, token0, ids, stripes, pages, 0, 0, 16, D, BLOCK, status)
            encode_into_(v, token0, ids, stripes, pages, 1, 0, 0, D, BLOCK, status)

        ms = graph_time_ms(call, repeats)
        assert int(status.item()) == 0, "encode status set"
        result[label] = {"tokens": n_tok, "ms": ms, "tokens_per_s": n_tok / (ms * 1e-3)}
    return result


def decode_layer_ms(batch: int, t: int, repeats: int) -> float:
    """One MosaicKV (compact-16) layer call at context t, cycling over layers as bench_decode does."""
    lays, wss, _ = mosaic_layers(batch, t, *MOSAIC_SUMMARIES["compact16"])
    q = torch.randn(batch, H_Q, D, device=DEV, dtype=DT)
    out = torch.empty_like(q)
    ms = time_cycle(
        [runner(lay, w, q, out, STAGE_ALL) for lay, w in zip(lays, wss, strict=True)],
        repeats,
    )
    assert int(wss[0].status.item()) == 0, "kernel status set"
    return ms


def bench_append(batches: list[int], repeats: int, context: int = 131072) -> list[dict]:
    """Per decode step (32 layers) cost of encoding the tokens that leave the window, three ways, vs
    the decode step at ``context`` (32 x one layer call), for each batch size (see append_times)."""
    results = []
    for batch in batches:
        times = append_times(batch, repeats)
        torch.cuda.empty_cache()
        dec_ms = decode_layer_ms(batch, context, repeats)
        step_ms = N_LAYERS * dec_ms
        row: dict = {
            "batch": batch,
            "context": context,
            "layers": N_LAYERS,
            "copies_cycled": times.pop("copies"),
        }
        row |= {"decode_layer_ms": dec_ms, "decode_step_ms": step_ms}
        for name, ms in times.items():
            step = ms if name == "batched_32_layers" else N_LAYERS * ms
            row[name] = {
                "call_ms": ms,
                "step_ms": step,
                "fraction_of_decode_step": step / step_ms,
            }
        results.append(row)
        parts = [
            f"{k} {row[k]['step_ms'] * 1e3:.1f} us ({row[k]['fraction_of_decode_step']:.1%})"
            for k in times
        ]
        print(
            f"  append B={batch}: decode step {step_ms * 1e3:.0f} us (layer {dec_ms * 1e3:.1f}); per step: "
            + ", ".join(parts),
            flush=True,
        )
    return results


def append_times(batch: int, repeats: int) -> dict:
    """Milliseconds per call of
      old_per_layer      encode_into_ per layer and request, K then V: re-encodes the 8 tokens of
                         the partial block (one CTA per head, R staged in shared memory)
      fused_per_layer    append_encode_ per layer: 8 x batch stripes, 1 new token each, K and V
      batched_32_layers  append_encode_ once per step: 32 x 8 x batch stripes
    Every stripe (layer, request, head) has its own rotation; the step's data is replicated over enough
    copies that each timed graph cycles through more than 4x the L2 cache (32 MB of rotations per
    step at batch 1), so R comes from DRAM as in a real step."""
    per_step = N_LAYERS * batch * H_KV  # stripes touched per decode step
    copies = max(1, math.ceil(4 * L2_BYTES / (per_step * 2 * D * D * 4)))
    n = (
        copies * per_step
    )  # stripe id = ((copy * N_LAYERS + layer) * batch + b) * H_KV + h
    rot = (
        torch.linalg.qr(torch.randn(n * 2, D, D, device=DEV))[0]
        .view(n, 2, D, D)
        .contiguous()
    )
    cap, pos = (
        8 * BLOCK,
        8 * BLOCK - 1,
    )  # the new token closes a block (mid-block costs the same)
    keep, ones = [KEEP] * n, [1] * n
    pools = AppendPools.allocate(
        cap,
        rot,
        keep,
        keep,
        ones,
        ones,
        summary_kind=0,
        summary_width=16,
        block=BLOCK,
        dtype=DT,
    )
    status = torch.zeros(1, dtype=torch.int32, device=DEV)
    x_new_k = torch.randn(n, D, device=DEV, dtype=DT)  # one new token per stripe
    x_new_v = torch.randn(n, D, device=DEV, dtype=DT)
    rows = torch.tensor([[i, i * D, D, 1, pos] for i in range(n)], device=DEV)
    x_block = torch.randn(
        BLOCK, H_KV, D, device=DEV, dtype=DT
    )  # old path: the partial block's tokens
    stripe_ids = torch.arange(n, dtype=torch.int32, device=DEV).view(
        -1, H_KV
    )  # [(copy, layer, b), H]
    width = 0 if pools.summary is None else pools.summary.shape[1]

    def old_layer(cl: int) -> None:
        for ids in stripe_ids[cl * batch : (cl + 1) * batch]:
            for which in (0, 1):
                encode_into_(
                    x_block,
                    cap - BLOCK,
                    ids,
                    pools.stripes,
                    pools.pages,
                    which,
                    0,
                    width if which == 0 else 0,
                    D,
                    BLOCK,
                    status,
                )

    def new_rows(lo: int, hi: int) -> Callable[[], None]:
        r = rows[lo:hi]
        return lambda: append_to_pools(pools, x_new_k, x_new_v, r, status)

    per_layer, n_layer_calls = batch * H_KV, copies * N_LAYERS
    out = {
        "copies": copies,
        "old_per_layer": time_cycle(
            [lambda cl=cl: old_layer(cl) for cl in range(n_layer_calls)], repeats
        ),
        "fused_per_layer": time_cycle(
            [
                new_rows(cl * per_layer, (cl + 1) * per_layer)
                for cl in range(n_layer_calls)
            ],
            repeats,
        ),
        "batched_32_layers": time_cycle(
            [new_rows(c * per_step, (c + 1) * per_step) for c in range(copies)], repeats
        ),
    }
    torch.cuda.synchronize()
    assert int(status.item()) == 0, "encode status set"
    return out


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted(
            (r["context"], r["ms"], r["bw_frac_of_copy"])
            for r in rows
            if r["method"] == method and r["batch"] == 1
        )
        if not pts:
            continue
        axes[0].plot(
            [p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=method
        )
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    for ax, ylabel in (
        (axes[0], "time per layer call (us)"),
        (axes[1], "bytes read / time, fraction of copy bw"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens (batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle(
        "H200 decode attention, Llama-3.1-8B shapes (32 q / 8 kv heads, d 128, bf16)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="JSON output; the plot goes beside it (.png)",
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[32768, 131072, 524288, 1048576]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--sections",
        choices=["all", "append"],
        default="all",
        help="all: decode sweep, encode and append; append: encode and append (with its decode reference)",
    )
    parser.add_argument("--append-batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    copies = copy_bandwidth_gbs()
    copy_bw = max(copies.values())
    print(
        f"copy bandwidth (read + write): {copies} GB/s; using {copy_bw:.0f}", flush=True
    )
    # Encode first: small and quick, so it is printed even if the decode part runs out of time.
    enc = bench_encode(args.repeats)
    print(json.dumps(enc, indent=1), flush=True)
    append = bench_append(args.append_batches, args.repeats)
    rows, stages = [], []
    if args.sections == "all":
        rows, stages = bench_decode(args.contexts, args.batches, args.repeats, copy_bw)
    ref = [
        r["ms"]
        for r in rows
        if r["method"] == "mosaic_compact16"
        and r["context"] == 131072
        and r["batch"] == 1
    ]
    if ref:
        enc["append_step"]["fraction_of_decode_step_128k"] = (
            enc["append_step"]["ms"] / ref[0]
        )
    doc = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
        "config": {
            "q_heads": H_Q,
            "kv_heads": H_KV,
            "head_dim": D,
            "dtype": "bfloat16",
            "keep": KEEP,
            "block": BLOCK,
            "token_ratio": RATIO,
            "n_sink": N_SINK,
            "window": WINDOW,
            "segment_len": SEG_LEN,
        },
        "copy_bw_gbs": copy_bw,
        "copy_bw_detail_gbs": copies,
        "decode": rows,
        "stages_ms": stages,
        "encode": enc,
        "append": append,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    if rows:
        plot(rows, args.out.with_suffix(".png"))
    for s in stages:
        print(
            f"stages T={s['context']} B={s['batch']}: "
            + ", ".join(f"{k} {v * 1e3:.1f}us" for k, v in s["ms"].items())
        )


if __name__ == "__main__":
    main()
