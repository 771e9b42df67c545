"""Stage-by-stage check of the CUDA decode on synthetic packed layouts (random bitmaps, random values):
the attention stage's partial outputs (per piece: max, sum of exp, unnormalised o' in the rotated V space;
and the dense sinks + window piece) against float64 torch over the same selection, then the merged
output. Localises a failure to the attention or the merge stage, which the end-to-end tests cannot.

    python bench/kernels/check_attend.py            # on a GPU machine with the extension built
    python bench/kernels/check_attend.py --cpu      # self-check of this script (no kernels)
"""

import argparse
import sys

import torch
from mosaickv.ops import STAGE_ALL, DecodeLayout, DecodeWorkspace, run_decode


def record(err: dict, name: str, ml: torch.Tensor, o_part: torch.Tensor, logits: torch.Tensor,
           values: torch.Tensor) -> None:
    """Worst errors so far of one piece's partials (ml: [g, 2] max and sum of exp, o_part: [g, d]
    unnormalised output) against float64 over the same logits [g, n] and values [n, d]."""
    m = logits.max(1).values
    p = torch.exp(logits - m[:, None])
    o = p @ values
    err[f"{name}_m"] = max(err[f"{name}_m"], (ml[:, 0] - m).abs().max().item())
    err[f"{name}_l"] = max(err[f"{name}_l"], (ml[:, 1] / p.sum(1) - 1).abs().max().item())
    err[f"{name}_o"] = max(err[f"{name}_o"], ((o_part - o).abs().max() / o.abs().max()).item())


def dense_rows(
    bits: torch.Tensor, vals: torch.Tensor, d: int, keep: int, n: int
) -> torch.Tensor:
    """[n, d] float64 rotated rows from a g = 1 packed side (W = d / 32 words, rows of round_up8(keep))."""
    w = d // 32
    words = bits[: n * w].view(n, w).long() & 0xFFFFFFFF
    mask = (
        ((words.unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1)
        .view(n, d)
        .bool()
    )
    stride = (keep + 7) // 8 * 8
    v = vals[: n * stride].view(n, stride)[:, :keep].double()
    out = torch.zeros(n, d, dtype=torch.float64, device=vals.device)
    out[mask] = v.reshape(-1)
    return out


def check(
    lay: DecodeLayout,
    ws: DecodeWorkspace,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    g: int,
) -> dict:
    """Max errors of the pieces (m, l, o') and of the output, against float64 torch."""
    d, h_kv = lay.head_dim, lay.n_kv_heads
    st = lay.flat.rows.cpu()
    kb, vb, kv, vv = lay.flat.kbits.cpu(), lay.flat.vbits.cpu(), lay.flat.kvals.cpu(), lay.flat.vvals.cpu()
    rot = lay.flat.rot.cpu().double()
    sel, pieces, n_pieces = ws.sel.cpu(), ws.pieces.cpu(), ws.n_pieces.cpu()
    part_o, part_ml = ws.part_o.cpu().double(), ws.part_ml.cpu().double()
    qd = q.cpu().double().view(lay.batch, h_kv, g, d)
    err = {
        "piece_m": 0.0,
        "piece_l": 0.0,
        "piece_o": 0.0,
        "dense_m": 0.0,
        "dense_l": 0.0,
        "dense_o": 0.0,
    }
    ref_out = torch.zeros(lay.batch, h_kv * g, d, dtype=torch.float64)
    blk = lay.block
    for bh in range(lay.batch * h_kv):
        b, h = divmod(bh, h_kv)
        logits, values = (
            [],
            [],
        )  # per (stripe or dense) part, in the original space for the output
        for i in range(int(n_pieces[bh])):
            first, last, s = (int(x) for x in pieces[bh, i])
            row = st[s]
            n_tok, keep_k, keep_v = int(row[2]), int(row[3]), int(row[4])
            k_all = dense_rows(kb[int(row[7]) :], kv[int(row[9]) :], d, keep_k, n_tok)
            v_all = dense_rows(vb[int(row[8]) :], vv[int(row[10]) :], d, keep_v, n_tok)
            blocks = sel[bh, first:last].long() - int(row[11])
            tok = (blocks[:, None] * blk + torch.arange(blk)).reshape(-1)
            tok = tok[tok < n_tok]
            qr = qd[b, h] @ rot[s, 0].T  # [g, d] rotated query
            sc = qr @ k_all[tok].T * scale  # [g, n]
            record(err, "piece", part_ml[bh, i], part_o[bh, i], sc, v_all[tok])  # rotated V space
            logits.append(sc)
            values.append(v_all[tok] @ rot[s, 1])  # un-rotated: v = R_V^T v'
        n_dense = int(lay.dense_len[b])
        dk = lay.dense_k[b, h, :n_dense].cpu().double()
        dv = lay.dense_v[b, h, :n_dense].cpu().double()
        sc = qd[b, h] @ dk.T * scale
        slot = ws.part_o.shape[1] - 1
        record(err, "dense", part_ml[bh, slot], part_o[bh, slot], sc, dv)
        logits.append(sc)
        values.append(dv)
        sc_all = torch.cat(logits, 1)
        ref_out[b, h * g : (h + 1) * g] = torch.softmax(sc_all, 1) @ torch.cat(
            values, 0
        )
    o = out.cpu().double()
    err["out_rel"] = ((o - ref_out).norm() / ref_out.norm()).item()
    err["out_finite"] = bool(torch.isfinite(o).all())
    return err


def fake_kernels(
    lay: DecodeLayout,
    ws: DecodeWorkspace,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    g: int,
) -> None:
    """--cpu: fill sel / pieces with a random selection and part_* / out with the reference, so that
    check() must report ~0 (tests this script, not the kernels)."""
    gen = torch.Generator().manual_seed(1)
    st = lay.flat.rows
    for bh in range(lay.batch * lay.n_kv_heads):
        b0, b1 = int(lay.block_ptr[bh]), int(lay.block_ptr[bh + 1])
        k = int(lay.n_select[bh])
        chosen = (torch.randperm(b1 - b0, generator=gen)[:k] + b0).sort().values
        ws.sel[bh, :k] = chosen.int()
        s0, s1 = int(lay.stripe_ptr[bh]), int(lay.stripe_ptr[bh + 1])
        n = 0
        for s in range(s0, s1):
            lo = int(st[s, 11])
            hi = int(st[s + 1, 11]) if s + 1 < s1 else b1
            idx = ((chosen >= lo) & (chosen < hi)).nonzero().view(-1)
            for j in range(0, idx.numel(), ws.piece_blocks):
                part = idx[j : j + ws.piece_blocks]
                ws.pieces[bh, n] = torch.tensor(
                    [int(part[0]), int(part[-1]) + 1, s], dtype=torch.int32
                )
                n += 1
        ws.n_pieces[bh] = n
    # Reference partials, written where the kernels would write them.
    d, h_kv, blk = lay.head_dim, lay.n_kv_heads, lay.block
    qd = q.double().view(lay.batch, h_kv, g, d)
    for bh in range(lay.batch * h_kv):
        b, h = divmod(bh, h_kv)
        outs, ms, ls = [], [], []
        for i in range(int(ws.n_pieces[bh])):
            first, last, s = (int(x) for x in ws.pieces[bh, i])
            row = st[s]
            n_tok = int(row[2])
            k_all = dense_rows(
                lay.flat.kbits[int(row[7]) :],
                lay.flat.kvals[int(row[9]) :],
                d,
                int(row[3]),
                n_tok,
            )
            v_all = dense_rows(
                lay.flat.vbits[int(row[8]) :],
                lay.flat.vvals[int(row[10]) :],
                d,
                int(row[4]),
                n_tok,
            )
            blocks = ws.sel[bh, first:last].long() - int(row[11])
            tok = (blocks[:, None] * blk + torch.arange(blk)).reshape(-1)
            tok = tok[tok < n_tok]
            sc = (qd[b, h] @ lay.flat.rot[s, 0].double().T) @ k_all[tok].T * scale
            m = sc.max(1).values
            p = torch.exp(sc - m[:, None])
            ws.part_ml[bh, i, :, 0], ws.part_ml[bh, i, :, 1] = (
                m.float(),
                p.sum(1).float(),
            )
            ws.part_o[bh, i] = (p @ v_all[tok]).float()
            outs.append(p @ v_all[tok] @ lay.flat.rot[s, 1].double())
            ms.append(m)
            ls.append(p.sum(1))
        n_dense = int(lay.dense_len[b])
        sc = qd[b, h] @ lay.dense_k[b, h, :n_dense].double().T * scale
        m = sc.max(1).values
        p = torch.exp(sc - m[:, None])
        slot = ws.part_o.shape[1] - 1
        ws.part_ml[bh, slot, :, 0], ws.part_ml[bh, slot, :, 1] = (
            m.float(),
            p.sum(1).float(),
        )
        ws.part_o[bh, slot] = (p @ lay.dense_v[b, h, :n_dense].double()).float()
        outs.append(p @ lay.dense_v[b, h, :n_dense].double())
        ms.append(m)
        ls.append(p.sum(1))
        gm = torch.stack(ms).max(0).values
        w = [torch.exp(mi - gm) for mi in ms]
        tot = sum(wi * li for wi, li in zip(w, ls, strict=True))
        o = sum(wi[:, None] * oi for wi, oi in zip(w, outs, strict=True)) / tot[:, None]
        out[b, h * g : (h + 1) * g] = o.to(out.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="self-check of the script with reference partials",
    )
    args = parser.parse_args()
    dev = "cpu" if args.cpu else "cuda"
    torch.manual_seed(0)
    ok = True
    cases = [  # (dtype, D, G, context, keep K, keep V, piece_blocks)
        (torch.bfloat16, 128, 4, 5000, 32, 32, 64),
        (torch.bfloat16, 128, 8, 3000, 32, 32, 8),
        (torch.float16, 128, 1, 4000, 32, 32, 16),
        (torch.bfloat16, 64, 4, 3000, 16, 16, 64),
        (torch.float16, 64, 8, 2500, 24, 24, 4),
        (torch.bfloat16, 128, 4, 6000, 48, 48, 64),  # keep > 32: values past the first 32 read in the walk
        (torch.bfloat16, 128, 8, 24000, 32, 32, 128),  # the largest pieces (MAX_PIECE_BLOCKS)
        (torch.bfloat16, 128, 4, 12000, 32, 32, 32),  # auto_piece_blocks' pieces for one wave of little work
        (torch.bfloat16, 128, 4, 5000, 32, 16, 64),  # K and V rows of different lengths (per-side keeps)
        (torch.float16, 128, 1, 4000, 16, 32, 16),
        (torch.bfloat16, 128, 4, 5000, 32, 24, 64),  # V rows on the one-walk path, K rows on the two-walk one
    ]
    for dt, d, g, ctx, keep, keep_v, pb in cases:
        lay = DecodeLayout.synthetic(
            2,
            2,
            d,
            ctx,
            keep=keep,
            keep_v=keep_v,
            block=8,
            token_ratio=0.1,
            n_sink=4,
            window=64,
            segment_len=2048,
            summary_kind=0,
            summary_width=16,
            dtype=dt,
            device=dev,
        )
        ws = DecodeWorkspace.plan(lay, g, piece_blocks=pb)
        q = (torch.randn(2, 2 * g, d, device=dev) * 2).to(dt)
        out = torch.full_like(q, float("nan"))
        scale = d**-0.5
        if args.cpu:
            fake_kernels(lay, ws, q, out, scale, g)
        else:
            ws.part_o.fill_(float("nan"))
            ws.part_ml.fill_(float("nan"))
            run_decode(lay, ws, q, out, scale, STAGE_ALL)
            torch.cuda.synchronize()
            assert int(ws.status.item()) == 0, "status set"
        e = check(lay, ws, q, out, scale, g)
        good = (
            e["out_finite"]
            and e["out_rel"] < 1e-2
            and max(e["piece_o"], e["dense_o"]) < 1e-2
            and max(e["piece_l"], e["dense_l"]) < 1e-2
            and max(e["piece_m"], e["dense_m"]) < 5e-2
        )
        ok &= good
        print(
            f"{'ok  ' if good else 'FAIL'} {str(dt)[6:]:>8} D={d} G={g} T={ctx} keep={keep}/{keep_v} pieces of {pb}: "
            + ", ".join(
                f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                for k, v in e.items()
            ),
            flush=True,
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
