"""mosaickv.ops on CPU: the fallback to the core reference, the flat GPU layout built from core caches,
fake (meta) implementations, and argument validation. The kernels themselves are checked against the
core reference on a GPU by test_ops_gpu.py."""

import math

import pytest
import torch
from append_scenarios import AppendCase, append_all, appended_rows, make_inputs, whole_segment
from dense_rows_case import check_dense_rows_case
from paged_read import stripe_rotation, stripe_side, stripe_summary
from torch._subclasses.fake_tensor import FakeTensorMode

from mosaickv.core import bitmap_words, block_summaries, make_method, pack_topk
from mosaickv.ops import (
    APPEND_COLS,
    FLAT_COLS,
    STAGE_ALL,
    STRIPE_COLS,
    AppendPools,
    DecodeLayout,
    DecodePlan,
    DecodeWorkspace,
    append_encode_,
    append_to_pools,
    auto_piece_blocks,
    decode_,
    decode_args,
    encode_side,
    n_select,
    round_up8,
    run_decode,
)

COL = {name: i for i, name in enumerate(STRIPE_COLS)}
FCOL = {name: i for i, name in enumerate(FLAT_COLS)}


def caches(method: str, lengths: list[int], **params: object) -> list:
    gen = torch.Generator().manual_seed(11)
    m = make_method(method, n_sink=4, window=16, block_size=8, token_ratio=0.1, segment_len=64, **params)
    out = []
    for t in lengths:
        k = (torch.randn(t, 2, 64, generator=gen) * torch.linspace(2, 0.2, 64)).to(torch.bfloat16)
        v = torch.randn(t, 2, 64, generator=gen).to(torch.bfloat16)
        out.append(m.encode(k, v))
    return out


def test_encode_side_cpu_layout_matches_core_pieces() -> None:
    gen = torch.Generator().manual_seed(0)
    s, h, d = 21, 2, 64
    x = torch.randn(s, h, d, generator=gen).to(torch.bfloat16)
    rot = torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))[0].float()
    keep, group = [12, 16], [2, 4]  # 12 is not a multiple of 8: rows are padded to 16
    vals, bits, summary = encode_side(x, rot, keep, group, d, 8, 1, 2 * d)
    xr = torch.einsum("shd,hed->hse", x.float(), rot)
    vo = bo = 0
    for i in range(h):
        ref_vals, ref_bits = pack_topk(xr[i], keep[i], group[i], None, torch.bfloat16)
        rows = vals[vo : vo + s * round_up8(keep[i])].view(s, round_up8(keep[i]))
        assert torch.equal(rows[:, : keep[i]], ref_vals)
        assert not rows[:, keep[i] :].any(), "padding must be zero"
        w = bitmap_words(d, group[i])
        assert torch.equal(bits[bo : bo + s * w].view(s, w), ref_bits.view(torch.int32))
        vo += s * round_up8(keep[i])
        bo += s * w
    assert vo == vals.numel() and bo == bits.numel()
    assert torch.equal(summary, block_summaries(xr, 8, "minmax", 0, torch.bfloat16))


def test_encode_side_fake_shapes() -> None:
    s, h, d = 37, 3, 128
    with FakeTensorMode():
        x = torch.empty(s, h, d, dtype=torch.float16)
        rot = torch.empty(h, d, d)
        vals, bits, summary = encode_side(x, rot, [32, 20, 8], [1, 2, 4], d, 8, 0, 16)
    assert vals.shape == (s * (32 + 24 + 8),) and vals.dtype == torch.float16
    assert bits.shape == (s * (4 + 2 + 1),) and bits.dtype == torch.int32
    assert summary.shape == (h, math.ceil(s / 8), 16)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"keep": [16, 15]}, "multiple of g"),
        ({"group": [3, 1]}, "multiple of g"),
        ({"block": 0}, "block must be"),
        ({"summary_width": 12}, "summary_width"),
        ({"dtype": torch.float32}, "bfloat16 or float16"),
    ],
)
def test_encode_side_rejects_bad_arguments(bad: dict, message: str) -> None:
    args = {"keep": [16, 16], "group": [1, 2], "block": 8, "summary_width": 128, "dtype": torch.bfloat16}
    args.update(bad)
    x = torch.randn(5, 2, 64).to(args["dtype"])
    rot = torch.eye(64).expand(2, 64, 64).contiguous()
    with pytest.raises(ValueError, match=message):
        encode_side(x, rot, args["keep"], args["group"], 64, args["block"], 1, args["summary_width"])


@pytest.mark.parametrize("method", ["mosaic", "quest"])
def test_decode_plan_cpu_falls_back_to_core(method: str) -> None:
    cs = caches(method, [150, 3, 77])
    q = torch.randn(3, 8, 64).to(torch.bfloat16)
    out = DecodePlan(cs, "cpu").run(q)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, c in enumerate(cs):
        assert torch.equal(out[b], c.attend(q[b]))


def test_layout_from_caches_describes_every_stripe() -> None:
    cs = caches("mosaic", [300, 5, 129], keep_ratio=None)  # strategy search: k and g vary per stripe
    lay = DecodeLayout.from_caches(cs, "cpu")
    assert lay.packed and lay.stripes.shape[1] == len(STRIPE_COLS)
    q = torch.randn(8, 64).to(torch.bfloat16)
    sid = 0
    for b, c in enumerate(cs):
        for h in range(2):
            bh = b * 2 + h
            assert int(lay.stripe_ptr[bh + 1] - lay.stripe_ptr[bh]) == len(c.segments)
            assert int(lay.block_ptr[bh + 1] - lay.block_ptr[bh]) == c.n_blocks
            if c.segments:
                assert int(lay.n_select[bh]) == c.select_blocks(q).shape[1]
            for seg in c.segments:
                row = lay.stripes[sid]
                assert int(row[COL["tokens"]]) == seg.length
                k, g = seg.k.keep[h], seg.k.group[h]
                assert (int(row[COL["keep_k"]]), int(row[COL["group_k"]])) == (k, g)
                for side, got in (("k", seg.k), ("v", seg.v)):  # read back through the page table
                    vals, bits = stripe_side(lay, sid, side, torch.bfloat16)
                    assert torch.equal(vals, got.values[h])
                    assert torch.equal(bits, got.bitmaps[h].view(torch.int32))
                    assert torch.equal(stripe_rotation(lay, sid, side), got.rotation[h])
                assert torch.equal(stripe_summary(lay, sid, torch.bfloat16), seg.summary[h])
                sid += 1
        dense = torch.cat([c.sink_k, c.tail_k])
        assert int(lay.dense_len[b]) == dense.shape[0]
        assert torch.equal(lay.dense_k[b, :, : dense.shape[0]], dense.transpose(0, 1))
    assert sid == lay.stripes.shape[0]


def test_workspace_plan_sizes_and_limits() -> None:
    lay = DecodeLayout.from_caches(caches("mosaic", [400, 90]), "cpu")
    ws = DecodeWorkspace.plan(lay, gqa_group=4, piece_blocks=2)
    n_sel = lay.n_select.tolist()
    assert ws.sel.shape == (4, max(n_sel))
    n_str = (lay.stripe_ptr[1:] - lay.stripe_ptr[:-1]).tolist()
    assert ws.pieces.shape[1] == max(math.ceil(a / 2) + s for a, s in zip(n_sel, n_str, strict=True))
    assert ws.part_o.shape == (4, ws.pieces.shape[1] + 1, 4, 64)
    with pytest.raises(ValueError, match="piece_blocks"):
        DecodeWorkspace.plan(lay, gqa_group=4, piece_blocks=129)
    assert DecodeWorkspace.plan(lay, gqa_group=4).piece_blocks == 64, "no GPU: the default pieces"


def test_pieces_grow_only_when_the_attention_runs_many_waves() -> None:
    """1M tokens, 8 KV heads, 13107 selected blocks and 16 stripes per head, on 132 SMs (4 CTAs
    each): batch 8 makes 64 x (103 + 16) = 7616 CTAs of 128 blocks, more than 8 waves (4224): pieces
    of 128. Batch 1 makes 952: pieces of 64. So does a machine without a GPU."""
    per_head = ([13107] * 64, [16] * 64)
    assert auto_piece_blocks(*per_head, n_sm=132) == 128
    assert auto_piece_blocks([13107] * 8, [16] * 8, n_sm=132) == 64
    assert auto_piece_blocks(*per_head, n_sm=None) == 64


def test_pieces_shrink_while_the_attention_has_little_work() -> None:
    """8 KV heads per sequence, on 132 SMs (a wave is 528 CTAs). 32K batch 1 (410 selected blocks,
    one stripe per head): pieces of 64 and 32 make at most 64 and 112 CTAs, fewer than the SMs, so
    16 (216). 64K batch 1 (819 blocks, 2 stripes): 32 (224 CTAs; 16 would fit a wave, but there is
    an SM for each CTA already). 128K batch 1 (1639, 2 stripes): 32 (432 CTAs, one wave). 32K batch 4:
    32 (448). 256K batch 1 (3277, 4 stripes): 64, since 32 would make 856 CTAs. 32K batch 8: 64 (896
    at 32). No halving below 16: 8 blocks and 1 stripe per head stay at 16 with only 16 CTAs."""
    assert auto_piece_blocks([410] * 8, [1] * 8, n_sm=132) == 16
    assert auto_piece_blocks([819] * 8, [2] * 8, n_sm=132) == 32
    assert auto_piece_blocks([1639] * 8, [2] * 8, n_sm=132) == 32
    assert auto_piece_blocks([410] * 32, [1] * 32, n_sm=132) == 32
    assert auto_piece_blocks([3277] * 8, [4] * 8, n_sm=132) == 64
    assert auto_piece_blocks([410] * 64, [1] * 64, n_sm=132) == 64
    assert auto_piece_blocks([8] * 8, [1] * 8, n_sm=132) == 16


def test_host_tables_match_the_kernel_header() -> None:
    """The Python copies of cuda/mosaickv/params.h's tables and limits: the stripe and append
    column orders, the summary kinds, the stage mask and the largest piece. A drift here made the
    binding refuse what the workspace allowed (pieces of 128 against a limit of 64)."""
    import re
    from pathlib import Path

    from mosaickv.ops.layout import MAX_PIECE_BLOCKS, SUMMARY_KIND_IDS

    header = (Path(__file__).resolve().parents[2] / "cuda/mosaickv/params.h").read_text()

    def enum_names(name: str, prefix: str) -> list[str]:
        body = re.search(rf"enum {name} : int \{{(.*?)\}};", header, re.S)
        assert body is not None, f"enum {name} not found in params.h"
        names = re.findall(rf"\b{prefix}(\w+)", re.sub(r"//[^\n]*", "", body.group(1)))
        columns = [n for n in names if not n.endswith("Cols")]  # kAppendCols / kStripeCols: the count
        return [re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower() for n in columns]

    def constant(name: str) -> int:
        found = re.search(rf"\b{name}\s*=\s*(\d+)", header)
        assert found is not None, f"{name} not found in params.h"
        return int(found.group(1))

    assert enum_names("StripeCol", "kCol") == list(STRIPE_COLS)
    assert enum_names("AppendCol", "kApp") == list(APPEND_COLS)
    assert constant("kSummaryMean") == SUMMARY_KIND_IDS["mean"] == SUMMARY_KIND_IDS["compact"]
    assert constant("kSummaryMinMax") == SUMMARY_KIND_IDS["minmax"] == SUMMARY_KIND_IDS["compact_minmax"]
    assert constant("kStageAll") == STAGE_ALL
    assert constant("kMaxPieceBlocks") == MAX_PIECE_BLOCKS


def test_layout_rejects_methods_without_kernels() -> None:
    with pytest.raises(ValueError, match="'think'"):
        DecodeLayout.from_caches(caches("think", [200]), "cpu")


def test_decode_op_is_registered_with_a_fake_impl() -> None:
    lay = DecodeLayout.from_caches(caches("mosaic", [200]), "cpu")
    ws = DecodeWorkspace.plan(lay, gqa_group=4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 8, 64, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        decode_(*decode_args(lay, ws, q, out, 0.125, STAGE_ALL))
    assert out.shape == q.shape


def test_cuda_ops_refuse_cpu_tensors_with_a_pointer_to_core() -> None:
    lay = DecodeLayout.from_caches(caches("mosaic", [200]), "cpu")
    ws = DecodeWorkspace.plan(lay, gqa_group=4)
    q = torch.randn(1, 8, 64).to(torch.bfloat16)
    with pytest.raises(NotImplementedError):  # the torch op has no CPU kernel
        decode_(*decode_args(lay, ws, q, torch.empty_like(q), 0.125, STAGE_ALL))
    with pytest.raises(ValueError, match="DecodePlan"):
        run_decode(lay, ws, q, torch.empty_like(q), 0.125)


def test_synthetic_layout_has_the_documented_shape() -> None:
    """The benchmarks' synthetic layout: every row keeps exactly `keep` positions, offsets tile the
    pools without overlap, and the selection counts follow the core's rounding."""
    batch, h, d, t, keep, blk, seg = 2, 3, 64, 4 + 16 + 150, 12, 8, 64
    opts = {"keep": keep, "block": blk, "token_ratio": 0.1, "n_sink": 4, "window": 16, "segment_len": seg}
    opts |= {"summary_kind": 0, "summary_width": 16, "dtype": torch.bfloat16, "device": "cpu"}
    lay = DecodeLayout.synthetic(batch, h, d, t, **opts)
    seg_lens = [64, 64, 22]  # 150 compressed tokens in segments of 64
    assert lay.stripes.shape == (batch * h * len(seg_lens), len(STRIPE_COLS))
    assert lay.stripes[:, COL["tokens"]].tolist() == seg_lens * batch * h
    n_rows = 150 * batch * h
    words = lay.flat.kbits.view(n_rows, d // 32)
    popcount = sum(((words >> i) & 1).sum(-1) for i in range(32))
    assert popcount.tolist() == [keep] * n_rows
    ks = round_up8(keep)
    assert lay.flat.kvals.numel() == n_rows * ks
    assert not lay.flat.kvals.view(n_rows, ks)[:, keep:].any(), "row padding must be zero"
    assert lay.flat.rows[:, FCOL["kval_off"]].tolist() == [i * ks for i in _starts(seg_lens * batch * h)]
    assert lay.flat.rows[:, FCOL["kbit_off"]].tolist() == [i * d // 32 for i in _starts(seg_lens * batch * h)]
    for s in (0, 4, lay.stripes.shape[0] - 1):  # the page table addresses the same rows
        start = _starts(seg_lens * batch * h)[s]
        vals, bits = stripe_side(lay, s, "v", torch.bfloat16)
        assert torch.equal(vals, lay.flat.vvals.view(n_rows, ks)[start : start + vals.shape[0], :keep])
        assert torch.equal(bits, lay.flat.vbits.view(n_rows, d // 32)[start : start + vals.shape[0]])
        assert torch.equal(stripe_rotation(lay, s, "v"), lay.flat.rot[s, 1])
    blocks_bh = sum(math.ceil(s / blk) for s in seg_lens)
    assert lay.block_ptr.tolist() == [i * blocks_bh for i in range(batch * h + 1)]
    assert lay.n_select.tolist() == [n_select(blocks_bh, 0.1)] * (batch * h)
    assert lay.flat.summary.shape == (blocks_bh * batch * h, 16)
    eye = torch.eye(d).expand(lay.flat.rot.shape[0] * 2, d, d)
    r = lay.flat.rot.view(-1, d, d)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-4), "rotations must be orthonormal"
    ws = DecodeWorkspace.plan(lay, gqa_group=4)
    assert ws.sel.shape == (batch * h, n_select(blocks_bh, 0.1))
    with pytest.raises(ValueError, match="context"):
        DecodeLayout.synthetic(1, 1, d, 20, **opts)


def _starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


APPEND_CPU_CASES = {
    # mixed keep / g per stripe and side; first step ends mid-block, later steps cross block boundaries
    "compact_mixed_keep": AppendCase(64, (16, 12, 32, 8), (8, 16, 4, 24), (1, 2, 4, 1), (1, 4, 2, 1),
                                     (3, 1, 1, 5, 1, 8, 2), summary_kind=0, m=16),
    "compact_minmax_one_token_steps": AppendCase(64, (16, 20), (16, 16), (1, 2), (1, 1), (1,) * 11,
                                                 summary_kind=1, m=16),
    "full_minmax_truncated_chunked": AppendCase(64, (16, 8), (32, 16), (2, 4), (1, 2), (19, 2),
                                                summary_kind=1, m=64, channels=48),
    # evictions of many tokens, blocks of 16, from mid-block (the GPU test splits such rows over CTAs)
    "long_steps_block16_mean": AppendCase(64, (16, 8), (16, 16), (1, 2), (1, 1), (9, 100, 7, 48),
                                          summary_kind=0, m=16, block=16),
}  # fmt: skip


@pytest.mark.parametrize("case", list(APPEND_CPU_CASES))
def test_append_reference_token_by_token_equals_whole_segment_encode(case: str) -> None:
    """The CPU path of append_encode_: stripes filled over several calls (every stripe in each call)
    hold the rows of the core's whole-segment encode, zero padding, and the block summaries of
    block_summaries over the whole segment (running means from block_sum, min/max from the stored row)."""
    c = APPEND_CPU_CASES[case]
    rot, x_k, x_v = make_inputs(c, torch.bfloat16, seed=len(case))
    pools, status = append_all(c, rot, x_k, x_v, "cpu")
    assert status == 0
    for i in range(len(c.keep_k)):
        want, got = whole_segment(c, rot, x_k, x_v, i), appended_rows(pools, c, i)
        for which, keep in ((0, c.keep_k[i]), (1, c.keep_v[i])):
            assert torch.equal(got[f"bits{which}"], want[f"bits{which}"]), f"stripe {i} side {which}: bitmaps"
            vals = got[f"vals{which}"]
            torch.testing.assert_close(vals[:, :keep], want[f"vals{which}"], rtol=1e-2, atol=1e-3)
            assert not vals[:, keep:].any(), "padding must be zero"
        torch.testing.assert_close(got["summary"].float(), want["summary"].float(), rtol=1e-2, atol=1e-3)
    assert not pools.kvals[-5 * 8 :].any(), "nothing written past the appended rows"


def test_append_reference_flags_bad_rows_and_encodes_the_rest() -> None:
    c = APPEND_CPU_CASES["compact_minmax_one_token_steps"]
    rot, x_k, x_v = make_inputs(c, torch.float16, seed=3)
    pools = AppendPools.allocate(8, rot, [16, 20], [16, 16], [1, 2], [1, 1], summary_kind=1, summary_width=32,
                                 block=8, dtype=torch.float16)  # fmt: skip
    xk, xv = x_k[:, :1].contiguous(), x_v[:, :1].contiguous()
    status = torch.zeros(1, dtype=torch.int32)
    for bad_row in ([5, 0, 64, 1, 0], [0, 2, 64, 1, 0], [0, 64, 64, 1, 8], [0, 0, 64, 0, 0]):
        # stripe out of range; x_off not a multiple of 4; past the stripe's 8 rows; no tokens
        status.zero_()
        rows = torch.tensor([bad_row, [1, 64, 64, 1, 0]])
        append_to_pools(pools, xk, xv, rows, status)
        assert int(status) == 64, f"row {bad_row} must be flagged"
    assert pools.stripe_rows(0, 1, 0, 1)[1].any(), "the good row is encoded"
    assert not pools.stripe_rows(0, 0, 0, 8)[1].any(), "the bad rows write nothing"


def test_append_encode_fake_impl_and_argument_checks() -> None:
    c = APPEND_CPU_CASES["compact_mixed_keep"]
    rot, x_k, x_v = make_inputs(c, torch.bfloat16, seed=1)
    ones, keep = [1] * 4, [16] * 4
    pools = AppendPools.allocate(
        8, rot, keep, keep, ones, ones, summary_kind=0, summary_width=16, block=8, dtype=torch.bfloat16
    )
    rows = torch.tensor([[0, 0, 64, 1, 0]])
    xk, xv = x_k[:, :1].contiguous(), x_v[:, :1].contiguous()
    status = torch.zeros(1, dtype=torch.int32)
    tables = (pools.stripes, pools.pages)
    with FakeTensorMode(allow_non_fake_inputs=True):
        append_encode_(
            torch.empty_like(xk),
            torch.empty_like(xv),
            rows,
            *tables,
            pools.block_sum,
            0,
            16,
            64,
            64,
            8,
            status,
        )
    with pytest.raises(ValueError, match="block_sum"):
        append_encode_(xk, xv, rows, *tables, None, 0, 16, 64, 64, 8, status)
    with pytest.raises(ValueError, match="rows must be"):
        append_encode_(xk, xv, rows[:, :4], *tables, pools.block_sum, 0, 16, 64, 64, 8, status)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        append_encode_(xk.float(), xv.float(), rows, *tables, pools.block_sum, 0, 16, 64, 64, 8, status)
    with pytest.raises(ValueError, match="runs on CUDA"):
        append_encode_(xk, xv, rows, *tables, pools.block_sum, 0, 16, 64, 64, 8, status)


def test_append_dense_rows_reference_appends_one_row_per_sequence_and_advances_its_count() -> None:
    """The CPU reference of the kernel (the cache manager's CPU path of append_batch) on the case
    test_ops_gpu.py runs the kernel on: the same addresses, skip marks and counts."""
    check_dense_rows_case("cpu")


def test_attend_ablation_variants_still_apply_to_the_kernel(tmp_path) -> None:
    """bench/kernels/attend_ablation.py edits attention.cuh by exact text: a kernel change that moves
    that text must fail here, not on the next GPU lease."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "bench/kernels/attend_ablation.py"
    done = subprocess.run(
        [sys.executable, str(script), "make", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    source = (root / "cuda/mosaickv/attention.cuh").read_text()
    variants = sorted(p.name for p in tmp_path.iterdir())
    assert variants == sorted(["full", "one_walk", "no_mask", "no_expand", "no_flash", "no_load"])
    for name in variants:
        text = (tmp_path / name / "cuda/mosaickv/attention.cuh").read_text()
        assert (text == source) == (name == "full"), name
        assert (tmp_path / name / "python/mosaickv/ops/compile.py").is_file()
        assert not (tmp_path / name / "python/mosaickv/ops/build").exists()
