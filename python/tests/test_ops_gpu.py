"""CUDA kernels against the core reference on named scenarios (run on a GPU machine:
bench/kernels/gpu_session.sh). Every test here needs a CUDA GPU and the built extension; on a machine
without them each is reported as skipped with that reason."""

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from append_scenarios import AppendCase, append_all, appended_rows, make_inputs, whole_segment
from dense_rows_case import check_dense_rows_case

from mosaickv.core import make_method
from mosaickv.ops import (
    STRIPE_COLS,
    AppendPools,
    DecodeLayout,
    DecodePlan,
    DecodeWorkspace,
    append_to_pools,
    cuda_available,
    encode_side,
    run_decode,
)

pytestmark = pytest.mark.skipif(
    not cuda_available(), reason="needs a CUDA GPU and the built extension (python -m mosaickv.ops.compile)"
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def random_rotation(h: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))[0].float()


ENCODE_CASES = {
    # name: (S, H, D, keep, group, channels)
    "one_token_d64_g1": (1, 2, 64, 16, 1, 64),
    "odd_len_d128_g1": (37, 3, 128, 32, 1, 128),
    "block_multiple_d128_g2": (64, 2, 128, 32, 2, 128),
    "g4_truncated_d128": (50, 2, 128, 32, 4, 96),
    "d64_g4": (29, 2, 64, 16, 4, 64),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_matches_core(case: str, dtype: str) -> None:
    s, h, d, keep, g, ch = ENCODE_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    x = (torch.randn(s, h, d, generator=gen) * torch.linspace(2.0, 0.2, d)).to(DTYPES[dtype])
    rot = random_rotation(h, d, gen)
    for kind, width in ((1, 2 * d), (1, 32), (0, 32)):  # minmax, compact_minmax (m = 16), compact
        ref = encode_side(x, rot, [keep] * h, [g] * h, ch, 8, kind, width)
        out = encode_side(x.cuda(), rot.cuda(), [keep] * h, [g] * h, ch, 8, kind, width)
        bits_ref, bits_out = ref[1].view(s * h, -1), out[1].cpu().view(s * h, -1)
        same = (bits_ref == bits_out).all(1)
        # Top-k on energies computed in a different fp32 order may flip a near-tie; allow at most 1%.
        assert float(same.float().mean()) >= 0.99, f"{case}: only {float(same.float().mean()):.3f} rows match"
        vals_ref = ref[0].view(s * h, -1)[same].float()
        vals_out = out[0].cpu().view(s * h, -1)[same].float()
        assert rel_err(vals_out, vals_ref) < 1e-2
        assert rel_err(out[2].cpu().float(), ref[2].float()) < 1e-2


def _cycle(values: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(values[i % len(values)] for i in range(n))


APPEND_CASES = {
    # one new token per stripe, one layer's 8 heads (the decode step)
    "one_token_d128_compact16": AppendCase(128, (32,) * 8, (32,) * 8, (1,) * 8, (1,) * 8, (1,), 0, 16),
    # per-stripe keep and g; steps start mid-block and cross block boundaries
    "block_boundaries_mixed_keep": AppendCase(
        128, (32, 16, 48, 24, 64, 8), (16, 32, 8, 40, 32, 4), (1, 2, 4, 1, 1, 2), (1, 1, 2, 1, 4, 1),
        (3, 1, 4, 1, 7, 9, 1), 1, 16,
    ),
    # 4 layers x 3 requests x 8 heads = 96 stripes per launch, D = 64, full-width means
    "many_items_d64_mean": AppendCase(
        64, _cycle((16, 8, 24, 32), 96), _cycle((16, 32, 8), 96), _cycle((1, 2, 4, 1), 96),
        _cycle((1, 1, 2), 96), (1, 1, 6, 1), 0, 64,
    ),
    # a deferred flush of 21 tokens (more than one chunk of 8), g = 4 with truncation, full minmax
    "chunked_flush_g4_truncated": AppendCase(
        128, (32, 16), (32, 32), (4, 4), (1, 2), (21, 3), 1, 128, channels=96
    ),
    # evictions of hundreds of tokens, each row split over several CTAs (part 0: the partial blocks at
    # both ends, carrying the open block's running mean in block_sum; parts 1..: whole blocks)
    "evictions_split_mean": AppendCase(
        128, (32, 32, 16, 48), (32, 16, 32, 32), (1, 2, 1, 4), (1, 1, 2, 1), (5, 256, 3, 130, 64, 1), 0, 16,
        split=True,
    ),
    "evictions_split_minmax_block16": AppendCase(
        128, (32, 16), (32, 32), (1, 2), (1, 1), (9, 200, 7, 48), 1, 128, block=16, split=True
    ),
    "evictions_split_d64_mean": AppendCase(
        64, (16,) * 3, (16,) * 3, (1,) * 3, (1,) * 3, (256, 17, 100), 0, 64, split=True
    ),
}  # fmt: skip


def assert_rows_close(got: dict, want: dict, keep: int, which: int, what: str) -> None:
    """Bitmaps: >= 99 % of rows identical (fp32 order may flip a near-tie); values of those rows and
    (keys) the summaries within 1e-2; padding zero."""
    bits_got, bits_want = got[f"bits{which}"], want[f"bits{which}"]
    same = (bits_got == bits_want).all(1)
    assert float(same.float().mean()) >= 0.99, f"{what}: only {float(same.float().mean()):.3f} rows match"
    vals = got[f"vals{which}"]
    assert rel_err(vals[same, :keep].float(), want[f"vals{which}"][same, :keep].float()) < 1e-2, what
    assert not vals[:, keep:].any(), f"{what}: padding must be zero"
    if which == 0:
        assert rel_err(got["summary"].float(), want["summary"].float()) < 1e-2, f"{what}: summaries"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_append_encode_matches_reference(case: str, dtype: str) -> None:
    """The append kernel (every stripe of a step in one launch, K and V) against the op's CPU torch
    reference on the same calls, and against the core's encode of each whole segment."""
    c = APPEND_CASES[case]
    rot, x_k, x_v = make_inputs(c, DTYPES[dtype], seed=len(case))
    gpu, st_gpu = append_all(c, rot, x_k, x_v, "cuda")
    cpu, st_cpu = append_all(c, rot, x_k, x_v, "cpu")
    assert st_gpu == st_cpu == 0
    for i in range(len(c.keep_k)):
        got, ref = appended_rows(gpu, c, i), appended_rows(cpu, c, i)
        core = whole_segment(c, rot, x_k, x_v, i)
        for which, keep in ((0, c.keep_k[i]), (1, c.keep_v[i])):
            assert_rows_close(got, ref, keep, which, f"{case} stripe {i} side {which} vs reference")
            core_padded = dict(core)
            core_padded[f"vals{which}"] = torch.nn.functional.pad(core[f"vals{which}"], (0, 8))
            assert_rows_close(got, core_padded, keep, which, f"{case} stripe {i} side {which} vs core")


def test_append_encode_flags_bad_rows_like_the_reference() -> None:
    c = APPEND_CASES["one_token_d128_compact16"]
    rot, x_k, x_v = make_inputs(c, torch.bfloat16, seed=2)
    for device in ("cpu", "cuda"):
        pools = AppendPools.allocate(
            8, rot.to(device), [32] * 8, [32] * 8, [1] * 8, [1] * 8, summary_kind=0, summary_width=16,
            block=8, dtype=torch.bfloat16,
        )  # fmt: skip
        xk, xv = x_k[:, :1].contiguous().to(device), x_v[:, :1].contiguous().to(device)
        for bad_row in ([8, 0, 128, 1, 0], [0, 2, 128, 1, 0], [0, 128, 128, 1, 8], [0, 0, 128, 0, 0]):
            status = torch.zeros(1, dtype=torch.int32, device=device)
            rows = torch.tensor([bad_row, [1, 128, 128, 1, 0]], device=device)
            append_to_pools(pools, xk, xv, rows, status)
            assert int(status.item()) == 64, f"{device}: row {bad_row} must be flagged"
        assert pools.stripe_rows(0, 1, 0, 1)[1].any(), f"{device}: the good row is encoded"
        assert not pools.stripe_rows(0, 0, 0, 8)[1].any(), f"{device}: bad rows write nothing"


def build_caches(
    method: str, lengths: list[int], h_kv: int, d: int, dtype: torch.dtype, seed: int, **params: object
) -> list:
    gen = torch.Generator().manual_seed(seed)
    m = make_method(method, n_sink=4, window=16, block_size=8, token_ratio=0.10, segment_len=128, **params)
    caches = []
    for t in lengths:
        # Keys with a few strong channels and a drifting mean, like post-RoPE keys; values plain normal.
        scale = torch.linspace(3.0, 0.3, d)
        k = (torch.randn(t, h_kv, d, generator=gen) * scale + torch.randn(1, h_kv, d, generator=gen)).to(
            dtype
        )
        v = torch.randn(t, h_kv, d, generator=gen).to(dtype)
        caches.append(m.encode(k, v))
    return caches


DECODE_CASES = {
    # name: (method, lengths, H_kv, G, D, extra method params)
    "single_long_gqa4_d128": ("mosaic", [1500], 2, 4, 128, {}),
    "one_token": ("mosaic", [1], 2, 4, 128, {}),
    "shorter_than_window": ("mosaic", [11], 2, 1, 64, {}),
    "odd_length_gqa8_d64": ("mosaic", [629], 2, 8, 64, {}),
    "mixed_batch_gqa1": ("mosaic", [700, 3, 150, 1029], 2, 1, 128, {}),
    "mixed_batch_gqa4_compact": (
        "mosaic",
        [400, 1100],
        2,
        4,
        128,
        {"summary": "compact", "summary_channels": 16},
    ),
    "group2_mean": ("mosaic", [333], 1, 4, 128, {"group": 2, "summary": "mean"}),
    "full_minmax_d64": ("mosaic", [410], 2, 4, 64, {"summary": "minmax"}),
    "group4_truncated": ("mosaic", [520], 2, 4, 128, {"group": 4, "channels": 96}),
    "strategy_search": ("mosaic", [900], 2, 4, 128, {"keep_ratio": None}),
    "quest_dense_baseline": ("quest", [1300, 90], 2, 4, 128, {}),
    "quest_dense_gqa8_d64": ("quest", [629, 40], 2, 8, 64, {}),
    "quest_dense_gqa1_mixed": ("quest", [700, 3, 1029], 2, 1, 128, {}),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_core(case: str, dtype: str) -> None:
    method, lengths, h_kv, g, d, params = DECODE_CASES[case]
    dt = DTYPES[dtype]
    caches = build_caches(method, lengths, h_kv, d, dt, seed=len(case), **params)
    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(len(lengths), h_kv * g, d, generator=gen) * 2).to(dt)
    ref = torch.stack([c.attend(q[b]) for b, c in enumerate(caches)])
    plan = DecodePlan(caches, "cuda", piece_blocks=4)  # small pieces: many splits even at these sizes
    out = plan.run(q.cuda())
    torch.cuda.synchronize()
    assert int(plan.workspace.status.item()) == 0
    # Selection must equal the core's (same summaries, same rule).
    ws, lay = plan.workspace, plan.layout
    for b, c in enumerate(caches):
        if not c.segments:
            continue
        want = c.select_blocks(q[b])
        for h in range(h_kv):
            bh = b * h_kv + h
            n = int(lay.n_select[bh])
            got = ws.sel[bh, :n].cpu().long() - int(lay.block_ptr[bh])
            assert torch.equal(got, want[h]), f"{case}: selection differs for b={b} h={h}"
    err = rel_err(out.cpu(), ref)
    assert err < 2e-2, f"{case}: relative error {err:.2e}"


# Bitmaps of 32 set bits over 4 words (D = 128, keep 32) that the fast walks do not meet in random rows:
# empty words between non-empty ones, all bits in the top word or the bottom one, and a quarter of the
# values starting in each word.
EMPTY_WORD_BITMAPS = [
    [0, 0, 0, 0xFFFFFFFF],
    [0xAAAAAAAA, 0, 0x55555555, 0],
    [0, 0x0F0F0F0F, 0, 0xF0F0F0F0],
    [0xFFFFFFFF, 0, 0, 0],
    [0x000000FF, 0, 0, 0xFFFFFF00],
    [0x11111111, 0x22222222, 0x44444444, 0x88888888],
]


def test_decode_walks_bitmaps_with_empty_words() -> None:
    """The attention's walks over kept positions and its bitmap masks, on rows whose bitmaps have
    empty words anywhere (random rows almost never have one); the core reference reads the same
    rewritten bitmaps."""
    caches = build_caches("mosaic", [1500, 700], 2, 128, torch.bfloat16, seed=11)
    patterns = torch.tensor(EMPTY_WORD_BITMAPS, dtype=torch.int64)
    patterns = (patterns - (patterns >= 2**31).long() * 2**32).to(torch.int32)  # uint32 bits as int32
    for c in caches:
        for seg in c.segments:
            for side in (seg.k, seg.v):
                assert side.bitmaps is not None and side.group == [1, 1], "bitmaps of positions (g = 1)"
                for h, bm in enumerate(side.bitmaps):
                    rows = torch.arange(bm.shape[0]) + h  # each head its own rotation of the patterns
                    bm.view(torch.int32).copy_(patterns[rows % len(EMPTY_WORD_BITMAPS)])
    gen = torch.Generator().manual_seed(2)
    q = (torch.randn(2, 8, 128, generator=gen) * 2).to(torch.bfloat16)
    ref = torch.stack([c.attend(q[b]) for b, c in enumerate(caches)])
    plan = DecodePlan(caches, "cuda", piece_blocks=4)
    out = plan.run(q.cuda())
    torch.cuda.synchronize()
    assert int(plan.workspace.status.item()) == 0
    err = rel_err(out.cpu(), ref)
    assert err < 2e-2, f"relative error {err:.2e}"


def test_decode_cuda_graph_replay_matches_eager() -> None:
    caches = build_caches("mosaic", [800, 300], 2, 128, torch.bfloat16, seed=3)
    plan = DecodePlan(caches, "cuda", piece_blocks=8)
    q = torch.randn(2, 8, 128, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)
    plan.run(q, out=out)  # plans the workspace outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        plan.run(q, out=out)
    q2 = torch.randn_like(q, dtype=torch.float32).to(torch.bfloat16)
    q.copy_(q2)
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    eager = DecodePlan(caches, "cuda", piece_blocks=8).run(q2)
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), eager.cpu()) < 1e-6


@pytest.mark.parametrize("method", ["mosaic", "quest"])
def test_merge_stage_alone_repeats_the_whole_calls_output(method: str) -> None:
    """The merge's CTAs count themselves on their (b, h) as their stripes are done, and the last one
    sums the stripes into the output. The select zeroes the count each call and that last CTA does
    too, so the merge stage run alone (as the stage timings do), again and again, writes the whole
    call's output every time. Most stripes here have no selected block (their combine is empty), and
    the third sequence has no stripe at all (one token: only the dense piece)."""
    caches = build_caches(method, [1500, 700, 1], 2, 128, torch.bfloat16, seed=13)
    plan = DecodePlan(caches, "cuda", piece_blocks=4)
    q = (torch.randn(3, 8, 128, device="cuda") * 2).to(torch.bfloat16)
    whole = plan.run(q).clone()
    lay, ws = plan.layout, plan.workspace
    assert lay is not None and ws is not None
    idle = 0
    for bh in range(lay.batch * lay.n_kv_heads):
        s0, s1 = int(lay.stripe_ptr[bh]), int(lay.stripe_ptr[bh + 1])
        idle += int((ws.stripe_pieces[s0:s1, 1] == 0).sum())
    assert idle > 0, "some stripes have no selected block"
    ref = torch.stack([c.attend(q[b].cpu()) for b, c in enumerate(caches)])
    assert rel_err(whole.cpu(), ref) < 2e-2
    for _ in range(3):
        out = plan.run(q, out=torch.full_like(q, math.nan), stages=16)
        torch.cuda.synchronize()
        assert torch.equal(out, whole)
    assert int(ws.status.item()) == 0


@pytest.mark.parametrize("method", ["mosaic", "quest"])
def test_decode_reads_each_sequences_own_dense_rows_through_their_addresses(method: str) -> None:
    """With ``dense_rows`` (the cache manager's per-sequence buffers, no stacked copy) the output is
    exactly the stacked layout's; the stacked tensors given alongside (NaN here) are never read, nor
    are a buffer's rows past its length."""
    caches = build_caches(method, [700, 3, 150], 2, 128, torch.bfloat16, seed=5)
    plan = DecodePlan(caches, "cuda", piece_blocks=4)
    q = torch.randn(3, 8, 128, device="cuda").to(torch.bfloat16)
    stacked = plan.run(q).clone()  # plans the workspace
    lay, ws = plan.layout, plan.workspace
    assert ws is not None and lay.dense_rows is None
    bufs = []
    for b in range(3):
        n = int(lay.dense_len[b])
        buf = torch.full((2, *lay.dense_k.shape[1:]), math.nan, dtype=torch.bfloat16, device="cuda")
        buf[0, :, :n], buf[1, :, :n] = lay.dense_k[b, :, :n], lay.dense_v[b, :, :n]
        bufs.append(buf)
    rows = torch.tensor([[x[0].data_ptr() for x in bufs], [x[1].data_ptr() for x in bufs]], device="cuda")
    nan = torch.full_like(lay.dense_k, math.nan)
    own = replace(lay, dense_k=nan, dense_v=nan, dense_rows=rows)
    out = run_decode(own, ws, q, torch.empty_like(q), 128**-0.5)
    torch.cuda.synchronize()
    assert int(ws.status.item()) == 0
    assert torch.equal(out, stacked)


def test_append_dense_rows_appends_one_row_per_sequence_and_advances_its_count() -> None:
    """The kernel on the case the CPU reference passes in test_ops.py (a skip, a full buffer)."""
    check_dense_rows_case("cuda")


def compact16_layout(
    batch: int, heads: int, head_dim: int, tokens: int, *, keep: int, token_ratio: float, segment_len: int
) -> DecodeLayout:
    """A synthetic bf16 layout on the GPU: blocks of 8, 4 sinks, a 64-token window, compact-16 summaries."""
    return DecodeLayout.synthetic(
        batch,
        heads,
        head_dim,
        tokens,
        keep=keep,
        block=8,
        token_ratio=token_ratio,
        n_sink=4,
        window=64,
        segment_len=segment_len,
        summary_kind=0,
        summary_width=16,
        dtype=torch.bfloat16,
        device="cuda",
    )


def repaged_summaries(lay: DecodeLayout, rows_per_page: int) -> tuple[DecodeLayout, torch.Tensor]:
    """``lay`` (flat pools) with its summary rows moved into pages of ``rows_per_page`` rows, stored in
    reverse order, and the page table and stripe rows that find them there; also the pages' storage
    (keep it alive while the layout is used)."""
    assert lay.flat is not None and lay.flat.summary is not None
    summary = lay.flat.summary
    n_pages = -(-summary.shape[0] // rows_per_page)
    store = torch.zeros(n_pages * rows_per_page, summary.shape[1], dtype=summary.dtype, device=summary.device)
    addrs = []
    for i in range(n_pages):
        rows = summary[i * rows_per_page : (i + 1) * rows_per_page]
        at = (n_pages - 1 - i) * rows_per_page
        store[at : at + rows.shape[0]] = rows
        addrs.append(store[at].data_ptr())
    stripes = lay.stripes.clone()
    stripes[:, STRIPE_COLS.index("sum_pages")] = lay.pages.numel()
    stripes[:, STRIPE_COLS.index("sum_rows")] = rows_per_page
    pages = torch.cat([lay.pages, torch.tensor(addrs, dtype=torch.int64, device=lay.pages.device)])
    return replace(lay, stripes=stripes, pages=pages), store


@pytest.mark.parametrize("segment_len", [65536, 2000])
def test_score_finds_summary_rows_across_pages(segment_len: int) -> None:
    """The score reaches a tile's summary rows from its first row's page when the tile lies in one
    stripe: pages of 100 rows (the page of a row through a float reciprocal) and of 1536 (a tile of
    1024 blocks spans at most two pages), stored in reverse order, give the same keys as the flat
    layout, bit for bit. Stripes of 250 blocks put most tiles across stripes (the per-block path)."""
    torch.manual_seed(13)
    lay = compact16_layout(2, 2, 128, 300_000, keep=32, token_ratio=0.1, segment_len=segment_len)
    q = torch.randn(2, 8, 128, device="cuda").to(torch.bfloat16)

    def keys(layout: DecodeLayout) -> torch.Tensor:
        ws = DecodeWorkspace.plan(layout, gqa_group=4)
        run_decode(layout, ws, q, torch.empty_like(q), 128**-0.5, stages=1 | 2)
        torch.cuda.synchronize()
        return ws.keys[: layout.block_stripe.numel()].cpu()

    flat = keys(lay)
    for rows_per_page in (100, 1536):
        paged, store = repaged_summaries(lay, rows_per_page)
        assert torch.equal(keys(paged), flat), f"pages of {rows_per_page} rows"
        del store


def ordered_to_float(keys: torch.Tensor) -> torch.Tensor:
    """The scores that the kernels' order-preserving keys (float_to_ordered, int32 storage) encode."""
    u = keys.long() & 0xFFFFFFFF
    bits = torch.where(u >= 2**31, u - 2**31, 0xFFFFFFFF - u)  # positive scores: sign bit set
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # as int32 (a negative score's sign bit)
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize(
    "kind, width, segment_len",
    [
        (0, 16, 65536),  # compact-16 means, tiles in one stripe: the kernel's own scorer for them
        (0, 16, 2000),  # the same summaries, tiles across stripes: the per-block path
        (0, 32, 65536),  # compact-32 means: the wide rows' scorer, 4 lanes a row
        (1, 32, 65536),  # min/max of 16 channels: the kernel's own scorer again
        (1, 32, 2000),  # and the per-block path
        (1, 256, 65536),  # Quest's min/max over all 128 channels: the wide rows' scorer
        (1, 256, 2000),
        (0, 128, 65536),  # means of all 128 channels: the wide rows' scorer
    ],
)
def test_score_keys_encode_the_gqa_max_of_torchs_scores(kind: int, width: int, segment_len: int) -> None:
    """Each block's key decodes to max over the GQA group of q' . summary (kind 0) or of the bound
    sum_c max(q'_c lo_c, q'_c hi_c) (kind 1), q' the rotate stage's output, computed here in float64."""
    torch.manual_seed(17)
    lay = DecodeLayout.synthetic(
        2, 2, 128, 200_000, keep=32, block=8, token_ratio=0.1, n_sink=4, window=64,
        segment_len=segment_len, summary_kind=kind, summary_width=width, dtype=torch.bfloat16, device="cuda",
    )  # fmt: skip
    q = torch.randn(2, 8, 128, device="cuda").to(torch.bfloat16)
    ws = DecodeWorkspace.plan(lay, gqa_group=4)
    run_decode(lay, ws, q, torch.empty_like(q), 128**-0.5, stages=1 | 2)
    torch.cuda.synchronize()
    n = lay.block_stripe.numel()
    assert lay.flat is not None and lay.flat.summary is not None
    qr = ws.qrot[lay.block_stripe.long()].double()  # [n, G, D]: each block's stripe's q'
    rows = lay.flat.summary[:n].double()  # flat pools: block i's summary is row i
    if kind == 0:
        scores = torch.einsum("ngc,nc->ng", qr[:, :, :width], rows)
    else:
        m = width // 2
        x = qr[:, :, :m]
        scores = torch.maximum(x * rows[:, None, :m], x * rows[:, None, m:]).sum(-1)
    want = scores.max(1).values
    got = ordered_to_float(ws.keys[:n]).double()
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_select_cuts_pieces_over_many_short_stripes() -> None:
    """Stripes of 3 blocks, so a select thread's run of keys crosses stripe starts and one (b, h) has
    more stripes (4166) than the select CTA has threads: every stripe's run of the selected list is cut
    into pieces of <= piece_blocks blocks in order, each naming its stripe, exactly as a host-side walk
    over the sorted selection cuts it."""
    torch.manual_seed(11)
    lay = compact16_layout(1, 2, 64, 100_000, keep=16, token_ratio=0.3, segment_len=24)
    ws = DecodeWorkspace.plan(lay, gqa_group=4, piece_blocks=2)
    q = torch.randn(1, 8, 64, device="cuda").to(torch.bfloat16)
    ws.pieces.fill_(-1)
    run_decode(lay, ws, q, torch.empty_like(q), 64**-0.5, stages=1 | 2 | 4)
    torch.cuda.synchronize()
    assert int(ws.status.item()) == 0
    sel, pieces, n_pieces = ws.sel.cpu().tolist(), ws.pieces.cpu().tolist(), ws.n_pieces.cpu().tolist()
    stripes, sptr = lay.stripes.cpu(), lay.stripe_ptr.cpu().tolist()
    off, tok = STRIPE_COLS.index("block_off"), STRIPE_COLS.index("tokens")
    for bh in range(2):
        chosen = sel[bh][: int(lay.n_select[bh])]
        assert chosen == sorted(chosen)
        want = []
        for s in range(sptr[bh], sptr[bh + 1]):
            lo = int(stripes[s, off])
            first, end = bisect_left(chosen, lo), bisect_left(chosen, lo + -(-int(stripes[s, tok]) // 8))
            want += [[j, min(j + 2, end), s] for j in range(first, end, 2)]
        assert sptr[bh + 1] - sptr[bh] > 1024 and n_pieces[bh] == len(want)
        assert pieces[bh][: len(want)] == want, f"pieces differ for bh={bh}"


def select_and_check_against_a_stable_sort(
    lay: DecodeLayout, gqa_group: int, what: str, k_of_keys: Callable[[torch.Tensor], int] | None = None
) -> None:
    """Runs rotate, score and select on ``lay``, then checks every (b, h)'s selected ids against a
    stable descending sort of the score stage's keys (ties: lower block id first) and its piece count
    against the pieces of 64 that tile each stripe's share of that selection. ``k_of_keys``: sets each
    (b, h)'s n_select from its score keys (int64 holding the uint32 keys), from a first rotate + score
    with the same queries."""
    q = torch.randn(lay.batch, lay.n_kv_heads * gqa_group, lay.head_dim, device="cuda").to(torch.bfloat16)
    bptr, sptr = lay.block_ptr.cpu().tolist(), lay.stripe_ptr.cpu().tolist()
    if k_of_keys is not None:
        ws = DecodeWorkspace.plan(lay, gqa_group=gqa_group, piece_blocks=64)
        run_decode(lay, ws, q, torch.empty_like(q), lay.head_dim**-0.5, stages=1 | 2)
        keys = ws.keys.cpu().long() & 0xFFFFFFFF
        ks = [k_of_keys(keys[bptr[bh] : bptr[bh + 1]]) for bh in range(lay.batch * lay.n_kv_heads)]
        lay = replace(lay, n_select=torch.tensor(ks, dtype=torch.int32, device="cuda"))
    ws = DecodeWorkspace.plan(lay, gqa_group=gqa_group, piece_blocks=64)
    ws.sel.fill_(-1)
    ws.n_pieces.fill_(-1)
    run_decode(lay, ws, q, torch.empty_like(q), lay.head_dim**-0.5, stages=1 | 2 | 4)
    torch.cuda.synchronize()
    assert int(ws.status.item()) == 0
    keys = ws.keys.cpu().long() & 0xFFFFFFFF  # order-preserving uint32 score keys from the score stage
    stripes = lay.stripes.cpu()
    for bh in range(lay.batch * lay.n_kv_heads):
        b0, b1, k = bptr[bh], bptr[bh + 1], int(lay.n_select[bh])
        order = torch.sort(-keys[b0:b1], stable=True).indices[:k]
        want = torch.sort(order + b0).values
        assert torch.equal(ws.sel[bh, :k].cpu().long(), want), f"{what}: selection differs for bh={bh}"
        n_pieces = 0
        for s in range(sptr[bh], sptr[bh + 1]):
            lo = int(stripes[s, STRIPE_COLS.index("block_off")])
            hi = lo + -(-int(stripes[s, STRIPE_COLS.index("tokens")]) // 8)
            n_pieces += -(-int(((want >= lo) & (want < hi)).sum()) // 64)
        assert int(ws.n_pieces[bh]) == n_pieces, f"{what}: piece count differs for bh={bh}"


@pytest.mark.parametrize("ties", ["distinct", "all_tied"])
def test_select_matches_a_stable_sort_at_scale(ties: str) -> None:
    """The one-launch cluster select on long sequences (37K blocks per (b, h), spread over the CTAs
    of a cluster): the selected ids equal a stable descending sort of the block scores (ties: lower
    block id first) and the pieces tile each stripe's selection. all_tied: every block of a stripe
    has the same summary, so each stripe's scores are one value and the tie rule decides."""
    torch.manual_seed(5)
    lay = compact16_layout(2, 8, 128, 300_000, keep=32, token_ratio=0.1, segment_len=65536)
    if ties == "all_tied":
        lay.flat.summary[:] = torch.randn(16, device="cuda").to(torch.bfloat16)
    select_and_check_against_a_stable_sort(lay, 4, ties)


def test_select_stops_when_the_first_digit_bucket_is_taken_whole() -> None:
    """Each (b, h) selects exactly the keys whose top 11 bits are at least those of its key at rank
    n/10: the first radix pass's threshold bucket is then taken whole, the select stops after that
    pass (threshold = the bucket's lowest key - 1, no ties taken), and the selection is still exact
    (the at-scale tests, with distinct and with tied keys, cover the later passes)."""
    torch.manual_seed(11)
    lay = compact16_layout(2, 8, 128, 300_000, keep=32, token_ratio=0.1, segment_len=65536)

    def through_the_bucket_at_a_tenth(keys: torch.Tensor) -> int:
        bucket = int(torch.sort(keys, descending=True).values[len(keys) // 10]) >> 21
        k = int(((keys >> 21) >= bucket).sum())
        assert len(keys) // 10 < k < len(keys)
        return k

    select_and_check_against_a_stable_sort(lay, 4, "first bucket whole", through_the_bucket_at_a_tenth)


def test_select_reads_keys_past_its_shared_cache() -> None:
    """72 (b, h)s of 43.1K blocks: too many for clusters of two CTAs to run at once on an H200, so
    each (b, h) gets one CTA, whose 1024 runs of 43 keys (43 words apart) need more than the 41984
    words of its key cache: the runs of threads 976 and up stay in global memory, where every pass
    reads them strided over all threads and the gather reads each from its own thread. The
    selection is still exact."""
    torch.manual_seed(7)
    lay = compact16_layout(9, 8, 64, 345_000, keep=16, token_ratio=0.1, segment_len=65536)
    assert (lay.block_ptr[1:] - lay.block_ptr[:-1]).min() > 41984
    select_and_check_against_a_stable_sort(lay, 4, "past the cache")
