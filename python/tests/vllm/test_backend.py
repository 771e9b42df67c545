"""Builder, do_kv_cache_update and forward on CPU tensors against the mosaickv.core reference.

Real parts: vLLM's VllmConfig (CPU platform), its Attention layer (which builds our impl; the
backend is passed explicitly because vLLM's CPU platform answers every backend request with
CPU_ATTN), CommonAttentionMetadata, the forward context and the MosaicKV spec.
"""

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from mosaickv.core import make_method
from mosaickv.engines.vllm.backend import (
    MosaicKVAttentionBackend,
    MosaicKVAttentionImpl,
    MosaicKVMetadata,
    MosaicKVMetadataBuilder,
)

H_Q, H_KV, D = 8, 2, 64
BLOCK = 16
SCALE = D**-0.5


@dataclass
class Request:
    block: int  # first physical block
    k: torch.Tensor  # [T, H_KV, D] every token so far
    v: torch.Tensor


@pytest.fixture(scope="module")
def config() -> VllmConfig:
    return VllmConfig()


@pytest.fixture(scope="module")
def builder(config: VllmConfig) -> MosaicKVMetadataBuilder:
    spec = MosaicKVAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_KV, head_size=D, dtype=torch.float32))
    return MosaicKVMetadataBuilder(spec, ["layer0"], config, torch.device("cpu"))


def common(rows: list[tuple[Request, int, int]]) -> CommonAttentionMetadata:
    """rows: (request, cached tokens, new tokens) in batch order."""
    qsl = torch.tensor([0] + [n for _, _, n in rows], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq = torch.tensor([c + n for _, c, n in rows], dtype=torch.int32)
    width = max(-(-int(s) // BLOCK) for s in seq)
    table = torch.stack([torch.arange(r.block, r.block + width, dtype=torch.int32) for r, _, _ in rows])
    slots = torch.cat([table[i, torch.arange(c, c + n) // BLOCK] * BLOCK + torch.arange(c, c + n) % BLOCK
                       for i, (_, c, n) in enumerate(rows)]).long()
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(rows),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(n for _, _, n in rows),
        max_seq_len=int(seq.max()), block_table_tensor=table, slot_mapping=slots)


def naive_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention in float64: q [T, H_Q, D], k, v [T, H_KV, D] -> [T, H_Q, D]."""
    rep = H_Q // H_KV
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    logits = torch.einsum("thd,shd->hts", q.double(), kk) * SCALE
    t = q.shape[0]
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", logits.softmax(-1), vv).float()


_names = itertools.count()


def make_layer(config: VllmConfig) -> Attention:
    """A real vLLM attention layer on the MosaicKV backend (a fresh name: vLLM refuses duplicates)."""
    with set_current_vllm_config(config):
        return Attention(H_Q, D, SCALE, num_kv_heads=H_KV, prefix=f"model.layers.{next(_names)}.attn",
                         attn_backend=MosaicKVAttentionBackend)


def step(layer: Attention, builder: MosaicKVMetadataBuilder, config: VllmConfig,
         rows: list[tuple[Request, int, int]], k: torch.Tensor, v: torch.Tensor,
         q: torch.Tensor) -> torch.Tensor:
    """One vLLM step for one layer: build metadata, do_kv_cache_update, then forward."""
    cm = common(rows)
    md = builder.build(0, cm)
    impl = layer.impl
    assert isinstance(impl, MosaicKVAttentionImpl)
    out = torch.empty(q.shape[0], H_Q * D)
    kv_cache = torch.empty(0)  # the CPU path does not read vLLM's pages (see backend docstring)
    with set_forward_context({layer.layer_name: md}, config):
        impl.do_kv_cache_update(layer, k, v, kv_cache, cm.slot_mapping)  # type: ignore[arg-type]
        impl.forward(layer, q, k, v, kv_cache, md, out)  # type: ignore[arg-type]
    return out.view(-1, H_Q, D)


def test_builder_from_common_metadata(builder: MosaicKVMetadataBuilder) -> None:
    a, b = Request(3, torch.empty(0), torch.empty(0)), Request(40, torch.empty(0), torch.empty(0))
    md = builder.build(0, common([(a, 0, 37), (b, 120, 1)]))
    assert isinstance(md, MosaicKVMetadata)
    assert md.num_actual_tokens == 38 and md.num_reqs == 2
    assert md.query_start_loc.tolist() == [0, 37, 38]
    assert md.context_lens.tolist() == [0, 120]
    assert md.request_keys.tolist() == [3, 40]
    # b's token 120 sits in its 8th block (40 + 7), offset 120 - 7 * 16 = 8.
    assert md.slot_mapping.tolist()[-1] == (40 + 7) * BLOCK + 8


def test_mixed_prefill_and_decode_match_core(builder: MosaicKVMetadataBuilder, config: VllmConfig) -> None:
    torch.manual_seed(0)
    layer = make_layer(config)
    impl = layer.impl
    assert isinstance(impl, MosaicKVAttentionImpl)
    ref_method = make_method("mosaic", keep_ratio=0.25, group=1, token_ratio=0.25, block_size=8, n_sink=4,
                             window=8, segment_len=16, summary="minmax")
    new = lambda t: (torch.randn(t, H_KV, D), torch.randn(t, H_KV, D), torch.randn(t, H_Q, D))  # noqa: E731

    # Step 1: request a's prompt alone.
    a_k, a_v, a_q = new(120)
    a = Request(3, a_k, a_v)
    out = step(layer, builder, config, [(a, 0, 120)], a_k, a_v, a_q)
    torch.testing.assert_close(out, naive_causal(a_q, a_k, a_v), atol=1e-4, rtol=1e-4)
    ref = {3: ref_method.encode(a_k, a_v)}

    # Steps 2..: a decodes while b's prompt arrives in the same batch (prefill row first), then both
    # decode for long enough that pending tokens close into new segments.
    b_k, b_v, b_q = new(60)
    b = Request(40, b_k, b_v)
    for i in range(20):
        rows, ks, vs, qs = [], [], [], []
        if i == 0:
            rows.append((b, 0, 60))
            ks.append(b_k), vs.append(b_v), qs.append(b_q)
        for r in ([a] if i == 0 else [a, b]):
            k1, v1, q1 = new(1)
            rows.append((r, r.k.shape[0], 1))
            r.k, r.v = torch.cat([r.k, k1]), torch.cat([r.v, v1])
            ks.append(k1), vs.append(v1), qs.append(q1)
        out = step(layer, builder, config, rows, torch.cat(ks), torch.cat(vs), torch.cat(qs))
        pos = 0
        for (r, ctx, n), q in zip(rows, qs, strict=True):
            if ctx == 0:
                torch.testing.assert_close(out[pos:pos + n], naive_causal(q, r.k, r.v), atol=1e-4, rtol=1e-4)
                ref[r.block] = ref_method.encode(r.k, r.v)
            else:
                ref[r.block].append(r.k[-1:], r.v[-1:])
                expected = ref[r.block].attend(q[0], scale=SCALE)
                torch.testing.assert_close(out[pos], expected, atol=1e-5, rtol=1e-5)
            pos += n
    for block, cache in ref.items():
        assert impl.caches[block].length == cache.length
        assert len(impl.caches[block].segments) == len(cache.segments)
    assert len(ref[3].segments) > len(ref_method.encode(a_k, a_v).segments)  # decode closed one
    assert impl.kv_bytes == sum(c.nbytes for c in ref.values())


def test_decode_without_prompt_is_an_error(builder: MosaicKVMetadataBuilder, config: VllmConfig) -> None:
    layer = make_layer(config)
    r = Request(7, torch.randn(1, H_KV, D), torch.randn(1, H_KV, D))
    with pytest.raises(RuntimeError, match="never encoded"):
        step(layer, builder, config, [(r, 10, 1)], r.k, r.v, torch.randn(1, H_Q, D))


def test_chunked_prefill_continuation_is_refused(builder: MosaicKVMetadataBuilder,
                                                 config: VllmConfig) -> None:
    layer = make_layer(config)
    k, v = torch.randn(40, H_KV, D), torch.randn(40, H_KV, D)
    r = Request(9, k, v)
    step(layer, builder, config, [(r, 0, 20)], k[:20], v[:20], torch.randn(20, H_Q, D))
    with pytest.raises(NotImplementedError, match="no-enable-chunked-prefill"):
        step(layer, builder, config, [(r, 20, 20)], k[20:], v[20:], torch.randn(20, H_Q, D))


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"sliding_window": 4096}, "sliding window"),
    ({"alibi_slopes": [1.0] * H_Q}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "soft-capping"),
    ({"attn_type": "encoder_only"}, "decoder self-attention"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
])
def test_impl_refuses_unsupported_layers(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        MosaicKVAttentionImpl(H_Q, D, SCALE, H_KV, **kwargs)  # type: ignore[arg-type]


# evict_tokens 8 (not the default 256): the short decode runs close segments in the manager too
LOSSLESS = ('{"keep_ratio": 1.0, "group": 1, "token_ratio": 1.0, "block_size": 8, "n_sink": 4, '
            '"window": 8, "segment_len": 16, "summary": "minmax", "evict_tokens": 8%s}')


def run_mixed(layers: list[Attention], builder: MosaicKVMetadataBuilder, config: VllmConfig,
              after_step=lambda: None) -> list[torch.Tensor]:  # noqa: ANN001
    """The mixed prefill + decode steps of test_mixed_prefill_and_decode_match_core through every
    layer (each layer its own K/V, seeded): request a (block 3) prefills alone, then b (block 40)
    prefills beside a's decode, then both decode. Returns every (step, layer) output in order."""
    g = torch.Generator().manual_seed(0)
    new = lambda t: (torch.randn(t, H_KV, D, generator=g), torch.randn(t, H_KV, D, generator=g),  # noqa: E731
                     torch.randn(t, H_Q, D, generator=g))
    a, b = Request(3, torch.empty(0), torch.empty(0)), Request(40, torch.empty(0), torch.empty(0))
    lengths = {3: 0, 40: 0}
    outs = []
    for i in range(21):
        rows = [(a, 0, 120)] if i == 0 else [(b, 0, 60)] if i == 1 else []
        rows += [(r, lengths[r.block], 1) for r in ([a] if i == 1 else [a, b] if i > 1 else [])]
        n = sum(t for _, _, t in rows)
        # as in vLLM, one metadata object per step, shared by every layer of the KV cache group
        cm = common(rows)
        md = builder.build(0, cm)
        with set_forward_context({layer.layer_name: md for layer in layers}, config):
            for layer in layers:
                k, v, q = new(n)
                out = torch.empty(n, H_Q * D)
                layer.impl.do_kv_cache_update(layer, k, v, torch.empty(0), cm.slot_mapping)
                layer.impl.forward(layer, q, k, v, torch.empty(0), md, out)
                outs.append(out.view(-1, H_Q, D))
        after_step()
        for r, ctx, t in rows:
            lengths[r.block] = ctx + t
    return outs


def drain_shared_manager() -> None:
    """After each step: decode-time re-encodes swap in at fixed steps, whatever the threads do."""
    from mosaickv.engines.vllm import cache as manager_cache

    adapter = manager_cache.current()
    assert adapter is not None
    adapter.manager.drain()


def test_cache_manager_matches_core_in_the_lossless_setting(
        builder: MosaicKVMetadataBuilder, config: VllmConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from mosaickv.engines.vllm import cache as manager_cache
    from mosaickv.engines.vllm.plugin import patch_request_end

    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", LOSSLESS % ', "cache": "core"')
    core_layers = [make_layer(config) for _ in range(2)]
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", LOSSLESS % ', "cache": "manager"')
    manager_cache.close_shared()
    manager_layers = [make_layer(config) for _ in range(2)]
    assert [layer.impl.use_manager for layer in core_layers + manager_layers] == [False, False, True, True]
    try:
        want = run_mixed(core_layers, builder, config)
        got = run_mixed(manager_layers, builder, config, drain_shared_manager)
        for w, o in zip(want, got, strict=True):
            torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
        adapter = manager_cache.current()
        assert adapter is not None and not any(layer.impl.caches for layer in manager_layers)
        # one manager, one manager layer per vLLM layer, in construction order
        assert adapter.layers == {layer.layer_name: i for i, layer in enumerate(manager_layers)}
        stats = adapter.stats()
        assert stats["cache_requests"] == 2 and stats["cache_pages_used"] > 0
        assert stats["cache_reencodes"] >= 2  # decode closed segments in the manager too
        assert manager_layers[0].impl.kv_bytes > 0

        # vLLM removes the finished requests: the wrapped runner hook frees them (idempotently)
        class Runner(GPUModelRunner):
            pass

        patch_request_end(Runner)
        hook = Runner._on_request_state_removed
        patch_request_end(Runner)  # idempotent: wraps once
        assert Runner._on_request_state_removed is hook and getattr(hook, "_mosaickv", False)
        state = lambda first: SimpleNamespace(block_ids=([first, first + 1],))  # noqa: E731
        # a stale first block that now starts a live runner request is not released
        hook(SimpleNamespace(requests={"live": state(40)}), "old", state(40))
        assert sorted(adapter.held()) == [3, 40]
        runner = SimpleNamespace(requests={})
        hook(runner, "a", state(3))
        hook(runner, "a", state(3))
        hook(runner, "b", state(40))
        hook(runner, "none", None)
        assert adapter.held() == []
        stats = adapter.stats()
        assert stats["cache_requests"] == 0 and stats["cache_pages_used"] == 0
    finally:
        manager_cache.close_shared()


def test_cache_manager_pages_live_in_vllm_kv_cache(
        builder: MosaicKVMetadataBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    """With cache: manager the packed bytes are written into the KV cache vLLM allocated (its own
    ``allocate_kv_cache``, block-major layout: every layer's page of a block side by side), and the
    attention read back from there equals the core path in the lossless setting."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    from mosaickv.engines.vllm import cache as manager_cache

    config = VllmConfig()  # a fresh forward context: only these layers are the worker's
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", LOSSLESS % ', "cache": "core"')
    want = run_mixed([make_layer(config) for _ in range(2)], builder, config)
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", LOSSLESS % ', "cache": "manager"')
    manager_cache.close_shared()
    layers = [make_layer(config) for _ in range(2)]
    spec = MosaicKVAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_KV, head_size=D, dtype=torch.float32))
    page, n_blocks, names = spec.page_size_bytes, 96, [layer.layer_name for layer in layers]
    tensor = KVCacheTensor(size=2 * n_blocks * page, layers=names, layer_stride=page, block_stride=2 * page)
    kv_config = KVCacheConfig(num_blocks=n_blocks, kv_cache_tensors=[tensor],
                              kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    caches = allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout.BLHNC)
    for layer in layers:
        layer.bind_kv_cache(caches[layer.layer_name])
    buffer = caches[names[0]].untyped_storage()
    try:
        got = run_mixed(layers, builder, config, drain_shared_manager)
        for w, o in zip(want, got, strict=True):
            torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
        adapter = manager_cache.current()
        assert adapter is not None
        pool = adapter.manager.pool
        stats = adapter.stats()
        # the pool is vLLM's memory and nothing else: no page of its own, every used page in the buffer
        assert pool.external and stats["cache_pages_used"] > 0
        assert stats["cache_page_reserved_bytes"] <= 2 * n_blocks * page
        used = [pool.page(p) for p in list(pool._refs)]
        assert all(t.untyped_storage().data_ptr() == buffer.data_ptr() for t in used)
        # the packed rows were written there (the pool spans both layers' pages: the first ones suffice)
        assert int(caches[names[0]].count_nonzero()) > 0
        for key in adapter.held():
            adapter.release(key)
        assert adapter.stats()["cache_pages_used"] == 0
    finally:
        manager_cache.close_shared()
