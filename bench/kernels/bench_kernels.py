"""Kernel benchmark on one GPU: Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, d = 128),
bf16, keep ratio 0.25, token ratio 0.10, block 8, 4 sinks + 64-token window, 64K-token segments.

Side by side in one run, per layer call (decode, one query token per sequence):
  sdpa_cudnn / sdpa_flash   full attention (GQA as [B, H_kv, G, D] queries over [B, H_kv, T, D])
  dense_select              our dense token-selection kernel (Quest min/max scoring + same select)
  mosaic_compact16          MosaicKV end to end (rotate q, score compact-16 summaries, select, attend)
  mosaic_cminmax16          MosaicKV with min/max of the first 16 rotated channels (core default)
  mosaic_minmax             MosaicKV with Quest-style min/max summaries over all D rotated channels
plus a stage breakdown, encode throughput, and the per-step cost of encoding appended tokens.
Caches are synthesised on the GPU at the right sizes (speed does not depend on values; selection
scores are random, so the selected set is as spread as it gets). Each timed call cycles over enough
distinct layers that the bytes read exceed the L2 cache several times over.

    python bench/kernels/bench_kernels.py --out bench/results/kernels-h200.json
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
    DecodeLayout,
    DecodeWorkspace,
    encode_into_,
    n_select,
    run_decode,
)
from timing import copy_bandwidth_gbs, graph_time_ms

H_Q, H_KV, D, G = 32, 8, 128, 4
KEEP, BLOCK, RATIO, N_SINK, WINDOW, SEG_LEN = 32, 8, 0.10, 4, 64, 65536
DT = torch.bfloat16
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
    return DecodeLayout(
        packed=False,
        stripes=torch.tensor(rows, dtype=torch.int64, device=DEV),
        stripe_ptr=torch.arange(bh + 1, dtype=i32, device=DEV),
        block_ptr=torch.arange(bh + 1, dtype=i32, device=DEV) * nb,
        block_stripe=torch.arange(bh, dtype=i32, device=DEV).repeat_interleave(nb),
        rot=None,
        kbits=torch.zeros(8, dtype=i32, device=DEV),
        vbits=torch.zeros(8, dtype=i32, device=DEV),
        kvals=k.view(-1, D),
        vvals=v.view(-1, D),
        summary=torch.randn(bh * nb, 2 * D, device=DEV, dtype=DT),
        summary_kind=1,
        block=BLOCK,
        n_select=torch.full((bh,), n_select(nb, RATIO), dtype=i32, device=DEV),
        dense_k=torch.randn(batch, H_KV, N_SINK + WINDOW, D, device=DEV, dtype=DT),
        dense_v=torch.randn(batch, H_KV, N_SINK + WINDOW, D, device=DEV, dtype=DT),
        dense_len=torch.full((batch,), N_SINK + WINDOW, dtype=i32, device=DEV),
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
    summ = lay.summary.shape[0] * lay.summary.shape[1] * 2
    dense = lay.batch * H_KV * (N_SINK + WINDOW) * D * 2 * 2
    rot = (
        0 if lay.rot is None else lay.stripes.shape[0] * 2 * D * D * 4
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
            for name, kind, width in (
                ("mosaic_compact16", 0, 16),
                ("mosaic_cminmax16", 1, 32),
                ("mosaic_minmax", 1, 2 * D),
            ):
                probe = synth_mosaic(batch, t, kind, width)
                rb = bytes_read(probe, 2 * (KEEP * 2 + 16))
                n_layers = layers_for(rb)
                lays = [probe] + [
                    synth_mosaic(batch, t, kind, width) for _ in range(n_layers - 1)
                ]
                wss = [DecodeWorkspace.plan(lay, G, piece_blocks=64) for lay in lays]
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
                    stage = {}
                    for label, mask in (
                        ("rotate_q", 1),
                        ("score", 2),
                        ("select", 4),
                        ("attend", 8),
                        ("merge", 16),
                    ):
                        calls = [
                            runner(lay, w, q, out, mask)
                            for lay, w in zip(lays, wss, strict=True)
                        ]
                        stage[label] = time_cycle(calls, repeats)
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
        stripes = torch.tensor(rows, dtype=torch.int64, device=DEV)
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
        status = torch.zeros(1, dtype=torch.int32, device=DEV)
        k = torch.randn(n_tok, H_KV, D, device=DEV, dtype=DT)
        v = torch.randn(n_tok, H_KV, D, device=DEV, dtype=DT)

        def call(
            k=k,
            v=v,
            token0=token0,
            stripes=stripes,
            rot=rot,
            ids=ids,
            bits=bits,
            vals=vals,
            vb=vb,
            vv=vv,
            summ=summ,
            status=status,
        ) -> None:
            encode_into_(
                k, token0, ids, stripes, rot, 0, bits, vals, summ, 0, D, BLOCK, status
            )
            encode_into_(
                v, token0, ids, stripes, rot, 1, vb, vv, None, 0, D, BLOCK, status
            )

        ms = graph_time_ms(call, repeats)
        assert int(status.item()) == 0, "encode status set"
        result[label] = {"tokens": n_tok, "ms": ms, "tokens_per_s": n_tok / (ms * 1e-3)}
    return result


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
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    for s in stages:
        print(
            f"stages T={s['context']} B={s['batch']}: "
            + ", ".join(f"{k} {v * 1e3:.1f}us" for k, v in s["ms"].items())
        )


if __name__ == "__main__":
    main()
