"""MosaicKV reference (python/mosaickv/core): the issue-3 "Must hold" list, over named scenarios.

Everything here runs on real tensors; references are written independently with plain torch.
"""

import math

import pytest
import torch

from mosaickv.core import (
    METHODS,
    CovarianceAccumulator,
    KVCache,
    Strategy,
    make_method,
    pack_topk,
    packed_part,
    popcount,
    search_strategy,
    unpack_values,
)
from mosaickv.core.strategy import dropped_energy

SMALL = {"n_sink": 4, "window": 16, "block_size": 8, "segment_len": 128}



# name -> (T, H_kv, GQA ratio, D)
SCENARIOS = {
    "prefill_multi_segment": (400, 2, 4, 32),
    "odd_length": (301, 2, 1, 32),
    "gqa_8": (260, 1, 8, 64),
    "shorter_than_window": (11, 2, 4, 32),
    "single_token": (1, 2, 2, 32),
}

METHOD_PARAMS = {
    "full": {},
    "quest": {"token_ratio": 0.25},
    "think": {"keep_ratio": 0.5},
    "naive2d": {"keep_ratio": 0.5, "token_ratio": 0.25},
    "mosaic": {"keep_ratio": 0.25, "token_ratio": 0.25},
    "mosaic_search": {"keep_ratio": None, "loss_threshold": 0.3, "token_ratio": 0.25, "summary": "compact",
                      "summary_channels": 8},
    "mosaic_cmm": {"keep_ratio": 0.3, "token_ratio": 0.2, "summary": "compact_minmax", "summary_channels": 8},
    "mosaic_g4_trunc": {"keep_ratio": 0.25, "group": 4, "channels": 16, "token_ratio": 0.3,
                        "summary": "mean"},
}


def build(label: str, **extra: object):
    name = label.split("_")[0]
    return make_method(name, **{**SMALL, **METHOD_PARAMS[label], **extra})


def structured_kv(t: int, h: int, d: int, seed: int, dtype=torch.float32):
    """Low-rank keys with a few strong channels plus noise: compressible like real caches."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(h, 4, d, generator=g)
    k = torch.einsum("thr,hrd->thd", torch.randn(t, h, 4, generator=g) * 3, basis)
    k = k + 0.3 * torch.randn(t, h, d, generator=g)
    v = torch.randn(t, h, d, generator=g) * torch.linspace(2, 0.1, d)
    return k.to(dtype), v.to(dtype)


def dense_reference(cache: KVCache, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention over the decompressed kept elements of exactly the attended tokens, in
    float64 (a float32 oracle's own rounding is of the order of the tolerance)."""
    mask = cache.attended_mask(q)
    h_kv, d = cache.n_kv_heads, cache.dim
    g = q.shape[0] // h_kv
    outs = []
    for h in range(h_kv):
        ks = [cache.sink_k[:, h], *[s.k.unpack(h) for s in cache.segments], cache.tail_k[:, h]]
        vs = [cache.sink_v[:, h], *[s.v.unpack(h) for s in cache.segments], cache.tail_v[:, h]]
        ks, vs = [x.double() for x in ks], [x.double() for x in vs]
        keys, vals = torch.cat(ks)[mask[h]], torch.cat(vs)[mask[h]]
        qh = q[h * g:(h + 1) * g].double()
        outs.append(torch.softmax(qh @ keys.T * scale, dim=-1) @ vals)
    return torch.cat(outs).view(-1, d).to(q.dtype)


def sdpa_full(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Plain dense attention of q: [H_q, D] over k, v: [T, H_kv, D] with repeat_kv GQA."""
    g = q.shape[0] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [H_q, T, D]
    vv = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.float()[:, None, :], kk, vv)
    return out[:, 0]


# ---- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,keep,channels", [(1, 8, None), (2, 12, None), (4, 16, None), (2, 8, 20)])
def test_pack_roundtrip_is_bit_exact_and_popcount_matches(dtype, group, keep, channels):
    x = torch.randn(57, 40, generator=torch.Generator().manual_seed(1)) * torch.rand(57, 1) * 10
    values, bitmap = pack_topk(x, keep, group, channels, dtype)
    assert values.dtype == dtype and values.shape == (57, keep)
    assert bitmap.dtype == torch.uint32 and bitmap.shape == (57, math.ceil(40 / group / 32))
    # popcount * g == keep on every row
    assert torch.equal(popcount(bitmap) * group, torch.full((57,), keep))
    # bit-exact round trip at the kept positions, zeros elsewhere
    dense = unpack_values(values, bitmap, 40, group)
    words = bitmap.to(torch.int64).tolist()
    for row in range(57):
        bits = sum(w << (32 * i) for i, w in enumerate(words[row]))
        kept = [p for p in range(40) if bits >> (p // group) & 1]
        assert len(kept) == keep
        if channels is not None:
            assert max(kept) < channels
        expect = torch.zeros(40, dtype=dtype)
        expect[kept] = x[row, kept].to(dtype)
        assert torch.equal(dense[row].view(torch.uint8), expect.view(torch.uint8))
        # the kept groups are the highest-energy ones among the allowed channels
        energy = x[row, : channels or 40].view(-1, group).pow(2).sum(-1)
        kept_groups = sorted({p // group for p in kept})
        dropped = [i for i in range(energy.shape[0]) if i not in kept_groups]
        if dropped:
            assert energy[kept_groups].min() >= energy[dropped].max()


def test_packed_part_never_reads_outside_the_bitmap():
    d, n, keep = 32, 20, 6
    gen = torch.Generator().manual_seed(3)
    allowed = torch.tensor([1, 4, 5, 9, 13, 17, 21, 22, 30, 31])
    pos = torch.stack([allowed[torch.randperm(10, generator=gen)[:keep]].sort().values for _ in range(n)])
    k_vals, v_vals = torch.randn(n, keep, generator=gen), torch.randn(n, keep, generator=gen)
    q = torch.randn(2, d, generator=gen)
    poisoned = torch.full_like(q, float("nan"))
    poisoned[:, allowed] = q[:, allowed]
    lse, out = packed_part(poisoned, k_vals, pos, v_vals, pos, None, 0.3)
    assert torch.isfinite(lse).all() and torch.isfinite(out[:, allowed]).all()
    keys = torch.zeros(n, d).scatter_(1, pos, k_vals)
    vals = torch.zeros(n, d).scatter_(1, pos, v_vals)
    p = torch.softmax(q @ keys.T * 0.3, dim=-1)
    torch.testing.assert_close(out[:, allowed], (p @ vals)[:, allowed])
    torch.testing.assert_close(lse, torch.logsumexp(q @ keys.T * 0.3, dim=-1))


# ---- PackedAttention math ----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("label", METHOD_PARAMS)
def test_attend_equals_dense_attention_over_kept_elements(label, scenario):
    t, h, ratio, d = SCENARIOS[scenario]
    k, v = structured_kv(t, h, d, seed=t + d)
    gen = torch.Generator().manual_seed(t + d)  # not the global RNG: the result must not depend on test order
    q_window = torch.randn(8, h * ratio, d, generator=gen)
    cache = build(label).encode(k, v, q_window=q_window)
    q = torch.randn(h * ratio, d, generator=gen) * 2
    scale = 0.7 / math.sqrt(d)
    out = cache.attend(q, scale=scale)
    assert out.shape == (h * ratio, d) and out.dtype == q.dtype
    torch.testing.assert_close(out, dense_reference(cache, q, scale), rtol=1e-4, atol=1e-5)


def test_attend_after_decode_appends_and_segment_closes():
    """Decode: tokens appended one by one (and in a burst) close into new segments; math still holds."""
    k, v = structured_kv(300, 2, 32, seed=5)
    for label in ("quest", "naive2d", "mosaic", "mosaic_search"):
        cache = build(label).encode(k[:150], v[:150], q_window=torch.randn(4, 4, 32))
        n_before = len(cache.segments)
        for i in range(150, 230):
            cache.append(k[i:i + 1], v[i:i + 1])
        cache.append(k[230:], v[230:])
        assert cache.length == 300 and len(cache.segments) > n_before
        assert all(s.length <= SMALL["segment_len"] for s in cache.segments[n_before:])
        starts = [s.start for s in cache.segments]
        assert starts == sorted(starts) and cache.segments[0].start == SMALL["n_sink"]
        q = torch.randn(4, 32)
        ref = dense_reference(cache, q, 32 ** -0.5)
        torch.testing.assert_close(cache.attend(q), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("label,params", [
    ("mosaic", {"keep_ratio": 1.0, "token_ratio": 1.0}),
    ("mosaic", {"keep_ratio": 1.0, "token_ratio": 1.0, "n_sink": 0, "window": 0}),
    ("think", {"keep_ratio": 1.0}),
    ("naive2d", {"keep_ratio": 1.0, "token_ratio": 1.0}),
    ("quest", {"token_ratio": 1.0}),
    ("full", {}),
])
def test_ratio_one_reproduces_full_attention(label, params):
    k, v = structured_kv(333, 2, 32, seed=9)
    q = torch.randn(8, 32)
    cache = make_method(label, **{**SMALL, **params}).encode(k, v, q_window=torch.randn(4, 8, 32))
    torch.testing.assert_close(cache.attend(q), sdpa_full(k, v, q), rtol=1e-4, atol=1e-5)


def test_compression_changes_the_output_so_the_checks_above_can_fail():
    k, v = structured_kv(333, 2, 32, seed=9)
    q = torch.randn(8, 32) * 3
    cache = build("mosaic").encode(k, v)
    assert (cache.attend(q) - sdpa_full(k, v, q)).abs().max() > 1e-3


def test_selection_matches_brute_force_quest_scores():
    """select_blocks against Quest's bound computed here from the raw keys, GQA max, global top-k."""
    k, v = structured_kv(500, 2, 32, seed=11)
    cache = build("quest").encode(k, v)
    q = torch.randn(8, 32)
    b = SMALL["block_size"]
    chosen = cache.select_blocks(q)
    for h in range(2):
        scores = []
        for seg in cache.segments:
            keys = k[seg.start:seg.start + seg.length, h]
            for lo in range(0, seg.length, b):
                blk = keys[lo:lo + b]
                qh = q[4 * h:4 * h + 4]
                bound = torch.maximum(qh * blk.min(0).values, qh * blk.max(0).values)
                scores.append(float(bound.sum(-1).max()))
        n_sel = math.ceil(0.25 * len(scores))
        expect = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n_sel])
        assert chosen[h].tolist() == expect


# ---- covariance and strategy -------------------------------------------------------------------
def test_incremental_covariance_equals_batch():
    x = torch.randn(203, 3, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64) + 2.0
    acc = CovarianceAccumulator(3, 16)
    for lo, hi in ((0, 1), (1, 50), (50, 50), (50, 203)):
        acc.update(x[lo:hi])
    for h in range(3):
        torch.testing.assert_close(acc.covariance()[h], torch.cov(x[:, h].T))
        torch.testing.assert_close(acc.second_moment()[h], x[:, h].T @ x[:, h] / 203)


def test_decode_segment_rotation_comes_from_the_pending_tokens():
    """A segment closed during decode is rotated by the eigenvectors of exactly its own tokens."""
    k, v = structured_kv(200, 2, 32, seed=12)
    cache = build("mosaic").encode(k[:30], v[:30])
    for i in range(30, 200):
        cache.append(k[i:i + 1], v[i:i + 1])
    seg = cache.segments[-1]
    toks = k[seg.start:seg.start + seg.length].double()
    for h in range(2):
        moment = toks[:, h].T @ toks[:, h] / seg.length
        evals = torch.linalg.eigvalsh(moment).flip(0)
        rot = seg.k.rotation[h].double()
        # rows are unit eigenvectors, eigenvalue descending: R M R^T = diag(evals)
        tol = 1e-3 * float(evals[0])
        torch.testing.assert_close(rot @ moment @ rot.T, torch.diag(evals), atol=tol, rtol=0)


def test_strategy_search_picks_most_compressive_under_threshold():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=gen) * torch.logspace(1, -1, 32)
    candidates = [Strategy(k, g) for k in (4, 8, 12, 16, 24) for g in (1, 2, 4) if k % g == 0]

    def loss(st: Strategy) -> float:  # brute force, per row
        e = x.pow(2).view(64, -1, st.group).sum(-1)
        kept = e.sort(dim=1, descending=True).values[:, : st.keep // st.group].sum()
        return float(1 - kept / x.pow(2).sum())

    for threshold in (0.02, 0.1, 0.3):
        chosen, chosen_loss = search_strategy(x, candidates, threshold, elem_bytes=2)
        ok = [c for c in candidates if loss(c) <= threshold]
        assert ok, "test data must leave a candidate under each threshold"
        best = min(c.keep * 2 + 4 * math.ceil(32 / c.group / 32) for c in ok)
        assert chosen.keep * 2 + 4 * math.ceil(32 / chosen.group / 32) == best
        assert loss(chosen) <= threshold and abs(chosen_loss - loss(chosen)) < 1e-5


def test_dropped_energy_per_head_matches_a_brute_force_per_row_loss():
    """Heads with different keep counts, groups and truncations in one call, one all-zero head."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 24, 32, generator=gen) * torch.logspace(1, -1, 32)
    x[3] = 0.0
    strategies = [Strategy(8, 1), Strategy(8, 2), Strategy(12, 4, 16), Strategy(4, 1), Strategy(16, 2, 24)]
    dropped, total = dropped_energy(x, strategies)
    for h, st in enumerate(strategies):
        xh = x[h].double()
        limit = 32 if st.channels is None else st.channels
        e = xh[:, :limit].pow(2).view(24, -1, st.group).sum(-1)
        kept = e.sort(dim=1, descending=True).values[:, : st.keep // st.group].sum()
        assert float(total[h]) == pytest.approx(float(xh.pow(2).sum()), rel=1e-12)
        assert float(dropped[h]) == pytest.approx(float(xh.pow(2).sum() - kept), rel=1e-9, abs=1e-12)
    assert float(dropped[3]) == 0.0 and float(total[3]) == 0.0


# ---- GQA and memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("label", METHOD_PARAMS)
def test_gqa_never_stores_query_head_copies(label):
    """H_q = H_kv, 4 H_kv, 8 H_kv: same bytes, every stored tensor indexed by KV head only."""
    k, v = structured_kv(260, 2, 32, seed=6)
    sizes = []
    for ratio in (1, 4, 8):
        cache = build(label).encode(k, v, q_window=torch.randn(4, 2 * ratio, 32))
        q = torch.randn(2 * ratio, 32)
        out = cache.attend(q)
        torch.testing.assert_close(out, dense_reference(cache, q, 32 ** -0.5), rtol=1e-4, atol=1e-5)
        sizes.append(cache.nbytes)
        assert cache.sink_k.shape[1] == cache.tail_k.shape[1] == 2
        for seg in cache.segments:
            for side in (seg.k, seg.v):
                assert len(side.values) == 2
                assert side.rotation is None or side.rotation.shape[0] == 2
            assert seg.summary is None or seg.summary.shape[0] == 2
    assert sizes[0] == sizes[1] == sizes[2]


@pytest.mark.parametrize("label", METHOD_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_real_storage_and_formula_predicts_it(label, dtype):
    k, v = structured_kv(410, 2, 32, seed=2, dtype=dtype)
    cache = build(label).encode(k, v, q_window=torch.randn(4, 4, 32))
    for i in range(410 - 40, 410):  # decode appends leave pending tokens (and mosaic accumulators)
        cache.append(k[i:i + 1], v[i:i + 1])
    storage = sum(t.untyped_storage().nbytes() for t in cache.tensors())
    assert cache.nbytes == storage
    # docs/FORMAT.md section "Memory formula"
    e, h, d, b = k.element_size(), 2, 32, SMALL["block_size"]
    dense = (cache.sink_k.shape[0] + cache.tail_k.shape[0]) * h * d * 2 * e
    predicted = dense
    for seg in cache.segments:
        s = seg.length
        for side in (seg.k, seg.v):
            predicted += sum(s * kk * e for kk in side.keep)
            if side.bitmaps is not None:
                predicted += sum(s * 4 * math.ceil(d / g / 32) for g in side.group)
            if side.rotation is not None:
                predicted += h * d * d * 4
        if seg.summary is not None:
            f = seg.k.keep[0] if seg.k.channel_mask is not None else d  # masks summarise kept channels
            m = cache.method.summary_channels
            width = {"mean": f, "minmax": 2 * f, "compact": m, "compact_minmax": 2 * m}[seg.summary_kind]
            predicted += h * math.ceil(s / b) * width * e
    if label.startswith(("think", "naive2d")):
        predicted += 2 * h * math.ceil(d / 32) * 4
    if label.startswith("mosaic") and cache.n_pending:
        predicted += 2 * (h * d + h * d * d) * 8
    assert cache.nbytes == predicted


# ---- edge cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("label", METHOD_PARAMS)
def test_edge_cases_small_and_empty(label):
    k, v = structured_kv(3, 2, 32, seed=1)
    cache = build(label).encode(k[:1], v[:1], q_window=torch.randn(1, 4, 32))
    cache.append(k[:0], v[:0])
    assert cache.length == 1
    cache.append(k[1:], v[1:])
    q = torch.randn(4, 32)
    torch.testing.assert_close(cache.attend(q), sdpa_full(k, v, q), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("label", METHOD_PARAMS)
def test_low_precision_inputs_store_input_dtype(label, dtype):
    k, v = structured_kv(200, 2, 32, seed=3, dtype=dtype)
    cache = build(label).encode(k, v, q_window=torch.randn(4, 4, 32, dtype=dtype))
    q = torch.randn(4, 32, dtype=dtype)
    out = cache.attend(q)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for seg in cache.segments:
        assert all(t.dtype == dtype for t in seg.k.values + seg.v.values)
    ref = dense_reference(cache, q.float(), 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_rejected(bad):
    k, v = structured_kv(40, 2, 32, seed=1)
    poisoned = k.clone()
    poisoned[7, 1, 3] = bad
    m = build("mosaic")
    with pytest.raises(ValueError, match="NaN/inf"):
        m.encode(poisoned, v)
    cache = m.encode(k, v)
    with pytest.raises(ValueError, match="NaN/inf"):
        cache.append(poisoned[:10], v[:10])
    with pytest.raises(ValueError, match="NaN/inf"):
        cache.attend(torch.full((2, 32), bad))


def test_bad_arguments_get_clear_errors():
    k, v = structured_kv(40, 2, 32, seed=1)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("snapkv")
    with pytest.raises(ValueError, match="keep_ratio"):
        make_method("mosaic", keep_ratio=1.5)
    with pytest.raises(ValueError, match="group size"):
        make_method("mosaic", group=3).encode(k, v)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        build("mosaic").encode(k, v).attend(torch.randn(3, 32))
    with pytest.raises(ValueError, match="dtype"):
        build("mosaic").encode(k.to(torch.int32), v)
    with pytest.raises(ValueError, match="summary_channels"):
        make_method("mosaic", summary_channels=64).encode(k, v)
    with pytest.raises(ValueError, match="append expects"):
        build("mosaic").encode(k, v).append(k[:, :1], v[:, :1])
    assert set(METHODS) == {"full", "quest", "think", "naive2d", "mosaic"}


def test_think_without_query_window_says_it_falls_back():
    k, v = structured_kv(100, 2, 32, seed=1)
    with pytest.warns(UserWarning, match="key-norm|channel norms"):
        cache = build("think").encode(k, v)
    assert cache.state.scoring == "key-norm"
    assert build("think").encode(k, v, q_window=torch.randn(4, 2, 32)).state.scoring == "query"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("label", METHOD_PARAMS)
def test_cuda_matches_cpu(label):
    k, v = structured_kv(400, 2, 32, seed=8)
    qw, q = torch.randn(4, 8, 32), torch.randn(8, 32)
    cpu = build(label).encode(k, v, q_window=qw)
    gpu = build(label).encode(k.cuda(), v.cuda(), q_window=qw.cuda())
    gpu.append(k[:5].cuda(), v[:5].cuda())
    cpu.append(k[:5], v[:5])
    assert cpu.nbytes == gpu.nbytes
    assert torch.equal(cpu.select_blocks(q), gpu.select_blocks(q.cuda()).cpu())
    torch.testing.assert_close(gpu.attend(q.cuda()).cpu(), cpu.attend(q), rtol=1e-3, atol=1e-4)


# ---- per-head and per-side budgets, query-weighted selection ---------------------------------------
def test_head_and_value_keep_ratios_set_each_stripes_keep_count():
    torch.manual_seed(0)
    k, v = torch.randn(200, 3, 32), torch.randn(200, 3, 32)
    per_head = make_method("mosaic", keep_ratio=0.5, head_keep_ratios=(0.125, 0.25, 1.0), **SMALL)
    seg = per_head.encode(k, v).segments[0]
    assert seg.k.keep == [4, 8, 32] and seg.v.keep == [4, 8, 32]
    split = make_method("mosaic", keep_ratio=0.5, value_keep_ratio=0.125, **SMALL).encode(k, v)
    assert split.segments[0].k.keep == [16] * 3 and split.segments[0].v.keep == [4] * 3
    uniform = make_method("mosaic", keep_ratio=0.5, **SMALL).encode(k, v)
    assert split.nbytes < uniform.nbytes
    with pytest.raises(ValueError, match="head_keep_ratios has 2 ratios for 3 KV heads"):
        make_method("mosaic", keep_ratio=0.5, head_keep_ratios=(0.5, 0.5), **SMALL).encode(k, v)
    with pytest.raises(ValueError, match="value_keep_ratio needs a fixed keep_ratio"):
        make_method("mosaic", keep_ratio=None, value_keep_ratio=0.25)


def test_weighted_selection_keeps_what_the_queries_read():
    x = torch.tensor([[3.0, 1.0, 0.5, 0.2]])
    _, plain = pack_topk(x, 1, 1, None, torch.float32)
    _, weighted = pack_topk(x, 1, 1, None, torch.float32, torch.tensor([0.01, 100.0, 1.0, 1.0]))
    assert int(plain[0, 0]) == 0b0001 and int(weighted[0, 0]) == 0b0010


def test_query_weighting_lowers_the_score_error_of_those_queries():
    torch.manual_seed(1)
    t, d = 400, 32
    # Distinct variances per axis, so the rotation is close to the identity; the queries read the four
    # weakest axes, which magnitude ranking drops first.
    k = torch.randn(t, 1, d) * torch.linspace(4.0, 0.5, d)
    q = torch.zeros(16, 2, d)
    q[..., -4:] = torch.randn(16, 2, 4) * 3
    scale = d**-0.5

    def score_error(query_weight: float) -> float:
        cache = make_method("mosaic", keep_ratio=0.25, token_ratio=1.0, query_weight=query_weight,
                            **SMALL).encode(k, k, q_window=q)
        rows = torch.cat([cache.sink_k[:, 0].float()]
                         + [seg.k.unpack(0) for seg in cache.segments] + [cache.tail_k[:, 0].float()])
        qq = q.reshape(-1, d)
        return float(((qq @ rows.T - qq @ k[:, 0].T) * scale).pow(2).mean())

    assert score_error(1.0) < 0.5 * score_error(0.0)
