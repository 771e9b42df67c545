"""The cache manager on a CUDA device, its pages cut out of a vLLM-shaped KV cache tensor (run on a
GPU machine: bench/kernels/gpu_session.sh). Every test here needs a CUDA GPU and the built
extension; on a machine without them each is reported as skipped with that reason.

Oracle: the same manager fed the same tokens on the CPU (its own pages, the core reference's
attention); the CUDA side attends through the kernels."""

from dataclasses import replace

import pytest
import torch

from mosaickv.cache import CacheConfig, CacheManager, PagePool, TempSegment
from mosaickv.core import make_method
from mosaickv.engines.vllm.cache import page_storage
from mosaickv.ops import DecodePlan, cuda_available

pytestmark = pytest.mark.skipif(
    not cuda_available(), reason="needs a CUDA GPU and the built extension (python -m mosaickv.ops.compile)"
)

H_KV, H_Q, D, LAYERS = 8, 32, 128, 2
# every block attended: the kernels' block selection is tested against the core in test_ops_gpu.py; a
# bf16 near-tie could pick another block here and the comparison would test that, not the pages
PARAMS = dict(keep_ratio=0.25, token_ratio=1.0, segment_len=256, window=64, n_sink=4, min_segment_len=64)


def feed(mgr: CacheManager, k: torch.Tensor, v: torch.Tensor, prompt: int, rid: str = "r") -> None:
    """k, v [LAYERS, n, H_kv, D]: the first ``prompt`` tokens prefilled, the rest decoded one at a time."""
    mgr.add_request(rid)
    for layer in range(LAYERS):
        mgr.prefill(rid, layer, k[layer, :prompt], v[layer, :prompt])
    for t in range(prompt, k.shape[1]):
        for layer in range(LAYERS):
            mgr.append(rid, layer, k[layer, t : t + 1], v[layer, t : t + 1])
    mgr.drain()


def test_manager_in_a_vllm_shaped_kv_cache_on_cuda_matches_the_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(LAYERS, 1500, H_KV, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(1, H_Q, D, generator=gen).to(torch.bfloat16)
    # vLLM's block-major layout: [blocks, layers, H, N, C] bf16, one strided view per layer
    buf = torch.zeros(400, LAYERS, H_KV, 16, 208, dtype=torch.bfloat16, device="cuda")
    storage, page_bytes = page_storage([buf[:, layer] for layer in range(LAYERS)])
    method = make_method("mosaic", **PARAMS)
    config = CacheConfig(page_bytes=page_bytes)
    gpu = CacheManager(method, LAYERS, H_KV, D, torch.bfloat16, "cuda", config, storage)
    cpu = CacheManager(method, LAYERS, H_KV, D, torch.bfloat16, "cpu", config)
    try:
        feed(gpu, k.cuda(), v.cuda(), prompt=1200)
        feed(cpu, k, v, prompt=1200)
        assert gpu.pool.external and gpu.stats()["cache_reencodes"] >= 1  # decode closed a segment
        assert int(buf.count_nonzero()) > 0
        for layer in range(LAYERS):
            want = cpu.attend(["r"], layer, q).double()
            got = gpu.attend(["r"], layer, q.cuda()).cpu().double()
            assert float((got - want).norm() / want.norm()) < 2e-2
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.parametrize("storage", ["own", "vllm"])
def test_kernels_read_the_pages_in_place_like_a_flat_copy(storage: str) -> None:
    """Block-selecting attention over the pages (page tables, nothing gathered) equals the same
    kernels over a flat copy of each snapshot (``DecodePlan``): same data, same selection; in the
    pool's own chunks and in a vLLM-shaped (block-major, strided) KV cache."""
    gen = torch.Generator().manual_seed(1)
    method = make_method("mosaic", **(PARAMS | {"token_ratio": 0.25}))
    views: list[torch.Tensor] = []
    config = CacheConfig(evict_tokens=8)
    if storage == "vllm":
        buf = torch.zeros(700, LAYERS, H_KV, 16, 208, dtype=torch.bfloat16, device="cuda")
        views, page_bytes = page_storage([buf[:, layer] for layer in range(LAYERS)])
        config = CacheConfig(page_bytes=page_bytes, evict_tokens=8)
    mgr = CacheManager(method, LAYERS, H_KV, D, torch.bfloat16, "cuda", config, views)
    try:
        for rid, n, prompt in (("a", 1500, 1200), ("b", 900, 300)):  # b's decode closes segments
            k, v = (torch.randn(LAYERS, n, H_KV, D, generator=gen).bfloat16().cuda() for _ in range(2))
            feed(mgr, k, v, prompt, rid)
        q = torch.randn(2, H_Q, D, generator=gen).to(torch.bfloat16).cuda()
        for layer in range(LAYERS):
            got = mgr.attend(["a", "b"], layer, q).double()
            with mgr.view("a", layer) as ca, mgr.view("b", layer) as cb:
                want = DecodePlan([ca, cb], "cuda").run(q).double()
            assert float((got - want).norm() / want.norm()) < 1e-3
    finally:
        mgr.close()


@pytest.mark.parametrize("summary", ["compact", "compact_minmax", "mean"])
def test_the_append_kernel_packs_the_temporary_segment_like_the_torch_path(summary: str) -> None:
    """Decode tokens leaving the window: on CUDA one append_encode_ launch per eviction writes the
    temporary segment's pages and summaries. The torch path on the CPU, given the same strategy
    and tokens, packs the same rows (a near-tie may flip a bitmap row under fp32 summation order)
    and the same summaries."""
    gen = torch.Generator().manual_seed(2)
    method = make_method(
        "mosaic", **(PARAMS | {"token_ratio": 0.25, "summary": summary, "summary_channels": 16})
    )
    prompt, n = 600, 840  # 240 decode tokens, evicted 8 at a time into one temporary segment
    k, v = (torch.randn(n, H_KV, D, generator=gen).bfloat16() for _ in range(2))
    mgr = CacheManager(method, 1, H_KV, D, torch.bfloat16, "cuda", CacheConfig(evict_tokens=8))
    try:
        mgr.add_request("r")
        mgr.prefill("r", 0, k[:prompt].cuda(), v[:prompt].cuda())
        for t in range(prompt, n):
            mgr.append("r", 0, k[t : t + 1].cuda(), v[t : t + 1].cuda())
        view = mgr._stream("r", 0).snapshot.temp
        assert view is not None and view.length > 100 and view.temp.kernel
        view.temp.check()
        got = view.to_core()
        st = view.temp.strategy
        ref = TempSegment(method, view.temp.start, replace(st, rot_k=st.rot_k.cpu(), rot_v=st.rot_v.cpu()),
                          PagePool(4096, torch.device("cpu")), torch.bfloat16)  # fmt: skip
        a = view.temp.start
        ref.append(k[a : a + view.length], v[a : a + view.length])
        want = ref.view().to_core()
    finally:
        mgr.close()
    assert not ref.kernel and got.length == want.length
    for x, y in ((got.k, want.k), (got.v, want.v)):
        for h in range(H_KV):
            same = (x.bitmaps[h].cpu() == y.bitmaps[h]).all(dim=1)
            assert float(same.float().mean()) >= 0.99
            torch.testing.assert_close(
                x.values[h].cpu()[same].float(), y.values[h][same].float(), rtol=1e-2, atol=1e-2
            )
    torch.testing.assert_close(got.summary.cpu().float(), want.summary.float(), rtol=2e-2, atol=2e-2)


def test_decode_steps_never_wait_for_the_device() -> None:
    """Appends (one request or a batch at a time) and attention never synchronise the host with
    the device, evictions included: the temporary segment's first rows, its table growing past its region
    and its summary tensor moving, and the first attention over a segment the re-encoders swapped
    in. A wait would stall the decode thread behind every kernel queued before it (the CPU runs a
    step ahead of the GPU) and breaks CUDA-graph capture. CUDA's sync debug mode 'error' raises on
    any synchronising call."""
    gen = torch.Generator().manual_seed(3)
    method = make_method("mosaic", **(PARAMS | {"token_ratio": 0.25}))
    config = CacheConfig(page_bytes=1024, evict_tokens=8)  # small pages: the temp's table outgrows 16
    mgr = CacheManager(method, LAYERS, H_KV, D, torch.bfloat16, "cuda", config)
    steps = 300  # past segment_len pending tokens, so the re-encoders close a segment after resume
    k, v = (torch.randn(LAYERS, 900 + steps, H_KV, D, generator=gen).bfloat16().cuda() for _ in range(2))
    q = torch.randn(2, H_Q, D, generator=gen).bfloat16().cuda()
    prompts = {"a": 900, "b": 500}

    # each step's batch rows, indexed on the device (a list index is a blocking upload)
    batch_rows = torch.tensor([[n + t for n in prompts.values()] for t in range(steps + 1)], device="cuda")

    def step(t: int) -> None:  # odd steps append the batch in one call
        for layer in range(LAYERS):
            rows = [prompt + t for prompt in prompts.values()]
            if t % 2:
                kb, vb = (x[layer].index_select(0, batch_rows[t]) for x in (k, v))
                mgr.append_batch(list(prompts), layer, kb, vb)
            else:
                for rid, row in zip(prompts, rows, strict=True):
                    mgr.append(rid, layer, k[layer, row : row + 1], v[layer, row : row + 1])
            mgr.attend(list(prompts), layer, q)

    try:
        for rid, prompt in prompts.items():
            mgr.add_request(rid)
            for layer in range(LAYERS):
                mgr.prefill(rid, layer, k[layer, :prompt], v[layer, :prompt])
        torch.cuda.synchronize()
        mgr.pause()  # the re-encoders synchronise (their host copies), off the decode path
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(steps):
                step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        temp = mgr._stream("a", 0).temp
        assert temp is not None and temp.tables.per > 16 and temp.summary.shape[1] > 16  # both grew
        mgr.resume()
        mgr.drain()
        assert mgr.stats()["cache_reencodes"] >= 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(steps)  # the swapped-in segments' tables are built here
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        mgr.close()


@pytest.mark.parametrize("prompts", [{"a": 700, "b": 2, "c": 300}, {"a": 700}], ids=["three", "one"])
def test_a_batched_append_writes_what_an_append_per_request_writes(prompts: dict[str, int]) -> None:
    """append_batch on CUDA writes the window rows of the whole batch in one launch through the
    layer's DenseBatch, whose device row counts it advances (no upload until a sequence evicts); the
    requests' caches (dense rows, temporary and closed segments) and attention over them, every
    step, equal those of a manager given one append per request, through sinks (a 2-token prompt)
    and evictions. Nothing reads the batched manager's streams during the steps: its steady steps
    (one launch per append, the held layout per attend) run as in serving."""
    gen = torch.Generator().manual_seed(4)
    method = make_method("mosaic", **(PARAMS | {"token_ratio": 0.25}))
    steps = 200
    k, v = (torch.randn(LAYERS, 700 + steps, H_KV, D, generator=gen).bfloat16().cuda() for _ in range(2))
    q = torch.randn(len(prompts), H_Q, D, generator=gen).bfloat16().cuda()
    batched, single = (
        CacheManager(method, LAYERS, H_KV, D, torch.bfloat16, "cuda", CacheConfig(evict_tokens=8))
        for _ in range(2)
    )
    try:
        for mgr in (batched, single):
            for rid, n in prompts.items():
                mgr.add_request(rid)
                for layer in range(LAYERS):
                    mgr.prefill(rid, layer, k[layer, :n], v[layer, :n])
        steady = 0
        for t in range(steps):
            rows = [n + t for n in prompts.values()]
            for layer in range(LAYERS):
                # a steady step: the layer's batch exists (after its first step) and no request of
                # it evicts or fills its sinks (read from the manager given one append per request)
                windows = all(single._stream(rid, layer).window_row() is not None for rid in prompts)
                steady += t > 0 and windows
                batched.append_batch(list(prompts), layer, k[layer, rows], v[layer, rows])
                for rid, row in zip(prompts, rows, strict=True):
                    single.append(rid, layer, k[layer, row : row + 1], v[layer, row : row + 1])
                batched.drain()  # a segment closes in both or neither before the comparison
                single.drain()
                got = batched.attend(list(prompts), layer, q)  # reads the counts the append advanced
                assert torch.equal(got, single.attend(list(prompts), layer, q)), f"step {t}, layer {layer}"
        stats = batched.stats()
        # every step where no request evicts or fills its sinks was a steady one, attention too
        assert stats["cache_steady_appends"] == steady > steps * LAYERS // 2
        assert stats["cache_steady_attends"] > steps * LAYERS // 2
        batched.drain()
        single.drain()
        for layer in range(LAYERS):
            assert torch.equal(
                batched.attend(list(prompts), layer, q), single.attend(list(prompts), layer, q)
            )
            for rid in prompts:
                with batched.view(rid, layer) as got, single.view(rid, layer) as want:
                    assert got.length == want.length == prompts[rid] + steps
                    for x, y in (
                        (got.sink_k, want.sink_k),
                        (got.tail_k, want.tail_k),
                        (got.tail_v, want.tail_v),
                    ):
                        assert torch.equal(x, y)
                    assert [s.length for s in got.segments] == [s.length for s in want.segments]
    finally:
        batched.close()
        single.close()
