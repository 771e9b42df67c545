"""The vLLM adapter of the cache manager (mosaickv.engines.vllm.cache), in the main environment: it
imports no vLLM. Steps are fed the way ``MosaicKVAttentionImpl`` sees them: per layer, rows of
(request key = first block, first token, end token, cached tokens) and one metadata object per step.

Oracle: the core reference per (request, layer), in a lossless setting (keep every element, attend
every block), where the manager's temporary segment matches the core's dense pending tokens up to
float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mosaickv.cache import CacheConfig
from mosaickv.core import KVCache
from mosaickv.engines.vllm.cache import Row, VllmCacheAdapter
from mosaickv.engines.vllm.config import MosaicSettings

H_Q, H_KV, D, LAYERS = 4, 2, 32, 2
SCALE = D**-0.5
LOSSLESS = MosaicSettings(keep_ratio=1.0, token_ratio=1.0, n_sink=4, window=8, segment_len=16)


@pytest.fixture
def adapter() -> Iterator[VllmCacheAdapter]:
    # max_backlog_tokens=1: each append waits for the previous re-encode, so decode-time segment
    # closes are swapped in at fixed steps (the result does not depend on thread timing)
    a = VllmCacheAdapter.from_settings(
        LOSSLESS, LAYERS, H_KV, D, torch.float32, "cpu", CacheConfig(n_threads=1, max_backlog_tokens=1)
    )
    yield a
    a.close()


class Step:
    """One vLLM step's metadata object (only its identity matters to the adapter)."""


def kv(t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(t, H_KV, D, generator=g), torch.randn(t, H_KV, D, generator=g)


def test_steps_match_the_core_reference_and_pages_come_back(adapter: VllmCacheAdapter) -> None:
    g = torch.Generator().manual_seed(0)
    method = LOSSLESS.make_method()
    refs: dict[tuple[int, int], KVCache] = {}
    prompts = {3: 60, 40: 45}  # request key (first block) -> prompt tokens; 40 arrives at step 1
    lengths: dict[int, int] = {}
    for i in range(30):
        step = Step()
        rows: list[Row] = []
        pos = 0
        for req, n_prompt in prompts.items():
            if req == 40 and i == 0:
                continue
            n = n_prompt if req not in lengths else 1
            rows.append((req, pos, pos + n, lengths.get(req, 0)))
            pos += n
        q = torch.randn(len(rows), H_Q, D, generator=g)
        for layer in range(LAYERS):
            k, v = kv(pos, g)
            adapter.store(step, layer, rows, k, v)
            decode = [(b, req) for b, (req, _, _, cached) in enumerate(rows) if cached]
            for req, lo, hi, cached in rows:
                if cached == 0:
                    refs[req, layer] = method.encode(k[lo:hi], v[lo:hi])
                else:
                    refs[req, layer].append(k[lo:hi], v[lo:hi])
            if decode:
                out = adapter.attend(layer, [req for _, req in decode], q[[b for b, _ in decode]], SCALE)
                for j, (b, req) in enumerate(decode):
                    want = refs[req, layer].attend(q[b], scale=SCALE)
                    torch.testing.assert_close(out[j], want, atol=1e-5, rtol=1e-5)
        for req, lo, hi, cached in rows:
            lengths[req] = cached + hi - lo
    for (req, layer), ref in refs.items():
        assert adapter.manager.tokens(adapter._requests[req], layer) == ref.length == lengths[req]
    stats = adapter.stats()
    assert stats["cache_requests"] == 2 and stats["cache_reencodes"] >= 2 * LAYERS  # decode closes
    assert adapter.kv_bytes(3) > 0

    adapter.release(3)
    adapter.release(40)
    assert adapter.stats()["cache_pages_used"] == 0 and adapter.stats()["cache_requests"] == 0
    with pytest.raises(RuntimeError, match="never stored"):
        adapter.attend(0, [3], torch.randn(1, H_Q, D), SCALE)


def test_a_new_prompt_in_a_held_block_replaces_the_finished_request(adapter: VllmCacheAdapter) -> None:
    g = torch.Generator().manual_seed(1)
    k, v = kv(50, g)
    first = Step()
    for layer in range(LAYERS):  # every layer of one step stores into the same manager request
        adapter.store(first, layer, [(7, 0, 50, 0)], k, v)
    assert adapter.stats()["cache_requests"] == 1
    pages = adapter.stats()["cache_pages_used"]
    held = adapter._requests[7]

    # vLLM freed the finished request's blocks and gave block 7 to a new, shorter prompt
    k2, v2 = kv(30, g)
    second = Step()
    for layer in range(LAYERS):
        adapter.store(second, layer, [(7, 0, 30, 0)], k2, v2)
    assert adapter._requests[7] != held
    stats = adapter.stats()
    assert stats["cache_requests"] == 1 and 0 < stats["cache_pages_used"] < pages
    assert adapter.manager.tokens(adapter._requests[7], LAYERS - 1) == 30
    with pytest.raises(NotImplementedError, match="chunked prefill"):
        adapter.store(Step(), 0, [(7, 0, 2, 30)], k2[:2], v2[:2])


@pytest.mark.parametrize("layout", ["block-major", "heads-outermost"])
def test_a_prompt_fits_the_blocks_vllm_gives_it(layout: str) -> None:
    """cache: manager sizes vLLM's page from what the manager really stores: a prompt of whole
    segments fits in exactly the blocks vLLM allocates for its tokens (arena_reserve 0), and the
    same prompt in 15% fewer blocks is refused with CacheFull, not written past the pages."""
    from mosaickv.cache import CacheFull
    from mosaickv.engines.vllm.cache import page_storage

    settings = MosaicSettings(keep_ratio=0.25, segment_len=256, cache="manager", arena_reserve=0.0)
    block, n_kv, d = 16, 4, 64
    cell = settings.state_bytes(d, torch.bfloat16)  # bytes per token and head of a vLLM page
    tokens = settings.n_sink + 4 * settings.segment_len + settings.window
    k, v = (torch.randn(tokens, n_kv, d).to(torch.bfloat16) for _ in range(2))
    for blocks, fits in ((-(-tokens // block), True), (int(0.85 * tokens / block), False)):
        if layout == "block-major":  # [num_blocks, H, N, C] views of a [blocks, layers, page] buffer
            buf = torch.zeros(blocks, LAYERS, n_kv, block, cell // 2, dtype=torch.bfloat16)
            views = [buf[:, layer] for layer in range(LAYERS)]
        else:  # LHBNC: one slab per (head, block)
            buf = torch.zeros(LAYERS, n_kv, blocks, block, cell // 2, dtype=torch.bfloat16)
            views = [buf[layer].transpose(0, 1) for layer in range(LAYERS)]
        storage, page_bytes = page_storage(views)
        a = VllmCacheAdapter.from_settings(
            settings, LAYERS, n_kv, d, torch.bfloat16, "cpu", CacheConfig(page_bytes=page_bytes), storage
        )
        try:
            step = object()
            if fits:
                for layer in range(LAYERS):
                    a.store(step, layer, [(0, 0, tokens, 0)], k, v)
                assert a.stats()["cache_page_reserved_bytes"] <= buf.numel() * 2
            else:
                with pytest.raises(CacheFull, match="engine's KV cache"):
                    for layer in range(LAYERS):
                        a.store(step, layer, [(0, 0, tokens, 0)], k, v)
        finally:
            a.close()
