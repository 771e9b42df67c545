"""Cache manager on CPU tensors with real threads (issue 7).

The oracle is the core reference run synchronously on the same tokens (``KVCache.append`` one
token at a time): after the re-encoders drain, the manager's segments must be exactly the core's.
Synchronisation is by events and ``drain``/``pause``, never by sleeping.
"""

import gc
import itertools
import threading
import types

import pytest
import torch
from paged_read import COL, dense_rows, stripe_rotation, stripe_side, stripe_summary

import mosaickv.cache.manager as manager_module
from mosaickv.cache import (
    CacheConfig,
    CacheFull,
    CacheManager,
    HostBuffer,
    HostChunks,
    PagedBlob,
    PagedStripe,
    PagePool,
)
from mosaickv.cache.dense_batch import DenseBatch, dense_batch
from mosaickv.cache.host import SPARE_CHUNKS
from mosaickv.cache.segments import DenseRows
from mosaickv.cache.tables import pages_readable, snapshot_layout
from mosaickv.core import KVCache, make_method, pack_topk
from mosaickv.ops import STRIPE_COLS, DecodeLayout, DecodeWorkspace

H_KV, H_Q, D = 2, 4, 32


# Named scenarios: fixed keep closing at segment_len, and the searched strategy closing on drift.
SCENARIOS = {
    "fixed_len": dict(keep_ratio=0.25, segment_len=48, window=16, n_sink=4, drift=1e9, min_segment_len=8),
    "search_drift": dict(
        keep_ratio=None, segment_len=64, window=8, n_sink=2, drift=3.0, min_segment_len=16, summary="mean"
    ),
    "no_sinks_group2": dict(
        keep_ratio=0.25,
        group=2,
        segment_len=32,
        window=8,
        n_sink=0,
        drift=1e9,
        min_segment_len=8,
        summary="compact",
        summary_channels=8,
    ),
}


def tokens(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V whose distribution changes every 40 tokens (different dominant channels), so a rotation
    goes stale and the drift rule has something to detect."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H_KV, D, generator=g)
    v = torch.randn(n, H_KV, D, generator=g)
    for i in range(0, n, 40):
        scale = torch.ones(D)
        scale[torch.randperm(D, generator=g)[:4]] = 8.0
        k[i : i + 40] *= scale
    return k.to(dtype), v.to(dtype)


def synchronous(params: dict, k: torch.Tensor, v: torch.Tensor, n_prompt: int, chunk: int = 1) -> KVCache:
    """The core reference: the prompt encoded, then the decode tokens appended ``chunk`` at a time."""
    cache = make_method("mosaic", **params).encode(k[:n_prompt], v[:n_prompt])
    for i in range(n_prompt, k.shape[0], chunk):
        cache.append(k[i : i + chunk], v[i : i + chunk])
    return cache


def manager(
    params: dict, n_layers: int = 1, dtype: torch.dtype = torch.float32, **config: object
) -> CacheManager:
    return CacheManager(
        make_method("mosaic", **params), n_layers, H_KV, D, dtype, "cpu", CacheConfig(**config)
    )  # type: ignore[arg-type]


def feed(
    mgr: CacheManager, rid: str, k: torch.Tensor, v: torch.Tensor, n_prompt: int, layer: int = 0
) -> None:
    if n_prompt:
        mgr.prefill(rid, layer, k[:n_prompt], v[:n_prompt])
    for i in range(n_prompt, k.shape[0]):
        mgr.append(rid, layer, k[i : i + 1], v[i : i + 1])


def open_requests(
    managers: tuple[CacheManager, ...],
    prompts: dict[str, int],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Each request of ``prompts`` in every manager, prefilled with its first ``prompts[rid]`` tokens."""
    for mgr in managers:
        for rid, n in prompts.items():
            mgr.add_request(rid)
            mgr.prefill(rid, 0, data[rid][0][:n], data[rid][1][:n])


def assert_same_segments(mgr: CacheManager, rid: str, ref: KVCache, layer: int = 0) -> None:
    snap = mgr._stream(rid, layer).snapshot
    assert [(s.start, s.length) for s in snap.segments] == [(s.start, s.length) for s in ref.segments]
    for paged, seg in zip(snap.segments, ref.segments, strict=True):
        mine = paged.to_core()
        for a, b in ((mine.k, seg.k), (mine.v, seg.v)):
            assert torch.equal(a.rotation, b.rotation)
            for h in range(H_KV):
                assert torch.equal(a.values[h], b.values[h])
                assert torch.equal(a.bitmaps[h], b.bitmaps[h])  # type: ignore[index]
        if seg.summary is None:
            assert mine.summary is None
        else:
            assert torch.equal(mine.summary, seg.summary)  # type: ignore[arg-type]
    assert torch.equal(snap.dense.sink_k, ref.sink_k) and torch.equal(snap.dense.sink_v, ref.sink_v)
    # the core's dense tail = its pending tokens + window; ours = temporary segment + window
    n_temp = snap.temp.length if snap.temp is not None else 0
    assert n_temp == ref.n_pending
    assert torch.equal(snap.dense.window_k, ref.tail_k[ref.n_pending :])
    assert snap.length == ref.length


@pytest.mark.parametrize("name", SCENARIOS)
def test_drained_result_equals_synchronous_encode(name: str) -> None:
    params = SCENARIOS[name]
    k, v = tokens(400, seed=1)
    ref = synchronous(params, k, v, n_prompt=100)
    assert len(ref.segments) >= 4  # the scenario really closes decode segments
    if params["drift"] < 100:  # ... and some of them early, on the loss drift, others at segment_len
        lengths = {s.length for s in ref.segments[1:]}
        assert params["segment_len"] in lengths and min(lengths) < params["segment_len"]
    mgr = manager(params, n_threads=2)
    try:
        mgr.add_request("r")
        feed(mgr, "r", k, v, n_prompt=100)
        mgr.drain()
        assert_same_segments(mgr, "r", ref)
        prompt_segments = len(make_method("mosaic", **params).encode(k[:100], v[:100]).segments)
        assert mgr.stats()["cache_reencodes"] == len(ref.segments) - prompt_segments
    finally:
        mgr.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_evicting_a_block_at_a_time_equals_a_synchronous_encode_fed_in_blocks(name: str) -> None:
    """evict_tokens=8: tokens leave the window 8 at a time, as if the core were fed 8 at a time."""
    params = SCENARIOS[name]
    k, v = tokens(100 + 8 * 40, seed=7)
    ref = synchronous(params, k, v, n_prompt=100, chunk=8)
    assert len(ref.segments) >= 4
    mgr = manager(params, n_threads=2, evict_tokens=8)
    try:
        mgr.add_request("r")
        mgr.prefill("r", 0, k[:100], v[:100])
        window = params["window"]
        for i in range(100, k.shape[0]):
            mgr.append("r", 0, k[i : i + 1], v[i : i + 1])
            held = mgr._stream("r", 0).snapshot.dense.window_k.shape[0]
            assert window <= held < window + 8  # never evicted early, never held a block too long
        mgr.drain()
        assert_same_segments(mgr, "r", ref)
        assert mgr.tokens("r") == k.shape[0]
    finally:
        mgr.close()


def test_a_batched_append_equals_a_synchronous_encode_per_request() -> None:
    """append_batch (one row of k/v per request) holds for each request what the core holds fed its
    tokens one at a time: through sinks (a 2-token prompt), window growth and evictions. Bad
    batches are refused before anything is written."""
    params = SCENARIOS["fixed_len"]
    prompts = {"a": 100, "b": 2, "c": 57}
    data = {rid: tokens(300, seed=20 + i) for i, rid in enumerate(prompts)}
    mgr = manager(params, n_threads=2)
    try:
        for rid, n in prompts.items():
            mgr.add_request(rid)
            mgr.prefill(rid, 0, data[rid][0][:n], data[rid][1][:n])
        for t in range(160):
            k = torch.stack([data[rid][0][n + t] for rid, n in prompts.items()])
            v = torch.stack([data[rid][1][n + t] for rid, n in prompts.items()])
            mgr.append_batch(list(prompts), 0, k, v)
        with pytest.raises(ValueError, match="each request once"):
            mgr.append_batch(["a", "a"], 0, k[:2], v[:2])
        with pytest.raises(ValueError, match="one row of k/v per request"):
            mgr.append_batch(["a", "b"], 0, k, v)
        mgr.drain()
        for rid, n in prompts.items():
            k, v = data[rid]
            assert_same_segments(mgr, rid, synchronous(params, k[: n + 160], v[: n + 160], n_prompt=n))
    finally:
        mgr.close()


@pytest.mark.parametrize("prompts", [{"a": 100, "b": 2, "c": 57}, {"a": 100}], ids=["three", "one"])
def test_a_batched_append_through_the_dense_batch_writes_what_appends_write(prompts: dict[str, int]) -> None:
    """With evictions of 8 tokens most rows only grow a window: append_batch writes them through
    the layer's DenseBatch (on the CPU the reference of the append_dense_rows kernel: the same
    addresses, skip marks and device counts; test_cache_gpu.py runs the kernel), sinks through
    ``append``; an eviction's row too, the eviction itself deferred (no attention here runs it at the
    last layer, so the next step's general path does). The requests then hold exactly what one
    ``append`` per request leaves: segments, sinks and window. Nothing reads the batched manager's
    streams between steps, so its steady steps leave their rows unpublished until the end."""
    params = SCENARIOS["fixed_len"]
    data = {rid: tokens(300, seed=30 + i) for i, rid in enumerate(prompts)}
    batched, single = (manager(params, n_threads=2, evict_tokens=8) for _ in range(2))
    try:
        open_requests((batched, single), prompts, data)
        through_batch = steady = 0
        evicted = False  # whether a request of the manager given one append per request evicted
        for t in range(160):
            rows = [(data[rid][0][n + t], data[rid][1][n + t]) for rid, n in prompts.items()]
            # what each request's append does, read from the manager given one append per request
            window_rows = [single._stream(rid, 0).window_row() is not None for rid in prompts]
            through_batch += sum(window_rows)
            # after the first step, which makes the batch, and after one that made an eviction due
            steady += t > 0 and all(window_rows) and not evicted
            batched.append_batch(list(prompts), 0, *(torch.stack(x) for x in zip(*rows, strict=True)))
            before = [single._stream(rid, 0).snapshot.dense.n for rid in prompts]
            for rid, (k, v) in zip(prompts, rows, strict=True):
                single.append(rid, 0, k[None], v[None])
            evicted = any(
                single._stream(rid, 0).snapshot.dense.n <= n for rid, n in zip(prompts, before, strict=True)
            )
        assert through_batch > 160 * len(prompts) // 2
        # every step where no request fills its sinks (b fills them first) and none evicted the step
        # before is a steady step: one launch, no per-request work
        assert batched.stats()["cache_steady_appends"] == steady > 0
        batched.drain()
        single.drain()
        for rid in prompts:
            with batched.view(rid, 0) as got, single.view(rid, 0) as want:
                assert got.length == want.length == prompts[rid] + 160
                assert [s.length for s in got.segments] == [s.length for s in want.segments]
                for a, b in zip(got.segments, want.segments, strict=True):
                    for x, y in ((a.k, b.k), (a.v, b.v)):
                        assert all(torch.equal(p, q) for p, q in zip(x.values, y.values, strict=True))
                for x, y in ((got.sink_k, want.sink_k), (got.tail_k, want.tail_k), (got.tail_v, want.tail_v)):
                    assert torch.equal(x, y)
    finally:
        batched.close()
        single.close()


def test_the_layers_of_a_request_evict_on_different_steps() -> None:
    """evict_tokens=4 over 4 layers: layer l's first block leaves the window l tokens early (the
    phases are spread evenly over the evict_tokens steps), so with one token per step exactly one
    layer evicts on each step, and each layer evicts every 4 steps. Layer l then equals the core fed
    its first 4 - l decode tokens, then 4 at a time."""
    params = SCENARIOS["fixed_len"]
    n_prompt, n_layers = 100, 4
    k, v = tokens(n_prompt + 4 * 31, seed=11)
    mgr = manager(params, n_layers=n_layers, n_threads=2, evict_tokens=4)
    try:
        mgr.add_request("r")
        for layer in range(n_layers):
            mgr.prefill("r", layer, k[:n_prompt], v[:n_prompt])
        evicting: list[list[int]] = []
        for i in range(n_prompt, n_prompt + 4 * 30):
            before = [mgr._stream("r", layer).snapshot.dense.n for layer in range(n_layers)]
            for layer in range(n_layers):
                mgr.append("r", layer, k[i : i + 1], v[i : i + 1])
            after = [mgr._stream("r", layer).snapshot.dense.n for layer in range(n_layers)]
            evicting.append([layer for layer in range(n_layers) if after[layer] <= before[layer]])
        assert all(len(layers) == 1 for layers in evicting), evicting
        for layer in range(n_layers):
            steps = [i for i, layers in enumerate(evicting) if layer in layers]
            assert len(steps) >= 29 and all(b - a == 4 for a, b in itertools.pairwise(steps))
        for layer in range(n_layers):  # each layer on to its next eviction: nothing held past a block
            while mgr._stream("r", layer).snapshot.dense.n > params["n_sink"] + params["window"]:
                i = mgr.tokens("r", layer)
                mgr.append("r", layer, k[i : i + 1], v[i : i + 1])
        mgr.drain()
        for layer in range(n_layers):
            ref = make_method("mosaic", **params).encode(k[:n_prompt], v[:n_prompt])
            first, end = n_prompt + 4 - layer, mgr.tokens("r", layer)
            ref.append(k[n_prompt:first], v[n_prompt:first])
            for i in range(first, end, 4):
                ref.append(k[i : i + 4], v[i : i + 4])
            assert_same_segments(mgr, "r", ref, layer)
    finally:
        mgr.close()


def test_attention_equals_synchronous_when_nothing_is_pending() -> None:
    params = SCENARIOS["fixed_len"]
    # prompt 100 -> 4 sinks, one 80-token segment, a 16-token window; 3 x 48 decode tokens close
    # three segments exactly, so nothing is left pending and the two caches hold the same parts
    k, v = tokens(100 + 3 * 48, seed=2, dtype=torch.bfloat16)
    ref = synchronous(params, k, v, n_prompt=100)
    assert ref.n_pending == 0
    mgr = manager(params, dtype=torch.bfloat16, n_threads=1)
    try:
        mgr.add_request("r")
        feed(mgr, "r", k, v, n_prompt=100)
        mgr.drain()
        q = torch.randn(3, H_Q, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        got = mgr.attend(["r"], 0, q[:1])
        assert torch.equal(got[0], ref.attend(q[0]))
        assert torch.equal(
            mgr._stream("r", 0).snapshot.to_kvcache(mgr.method).select_blocks(q[1]), ref.select_blocks(q[1])
        )
    finally:
        mgr.close()


def test_temporary_segment_uses_previous_strategy() -> None:
    """Prefill leaves an empty temporary segment with the last prompt segment's strategy (the decode
    path never builds one), which attention skips until tokens leave the window into it."""
    params = SCENARIOS["fixed_len"]
    k, v = tokens(130, seed=4)
    mgr = manager(params, n_threads=1)
    try:
        mgr.add_request("r")
        mgr.pause()  # nothing is re-encoded: every decode token is served from the temporary segment
        mgr.prefill("r", 0, k[:100], v[:100])
        stream = mgr._stream("r", 0)
        ready = stream.temp
        assert ready is not None and ready.length == 0 and stream.snapshot.temp is None
        for i in range(100, 130):
            mgr.append("r", 0, k[i : i + 1], v[i : i + 1])
        snap = stream.snapshot
        assert snap.temp is not None and snap.temp.temp is ready
        assert snap.temp is not None and snap.temp.length == 30
        seg = snap.segments[-1]
        rows = snap.temp.to_core()
        x = torch.einsum(
            "shd,hed->hse", k[100 - 16 : 130 - 16].float(), seg.rotations.read()[0]
        )  # tokens that left the window
        for h in range(H_KV):
            vals, bits = pack_topk(x[h], seg.k[h].keep, seg.k[h].group, None, torch.float32)
            # one token at a time vs a batch: the rotation's float sums may differ in the last bit
            assert torch.allclose(rows.k.values[h], vals, rtol=1e-5, atol=1e-5)
            assert torch.equal(rows.k.bitmaps[h], bits)  # type: ignore[index]
        mgr.resume()
        mgr.drain()
    finally:
        mgr.close()


def test_attention_during_a_swap_sees_before_or_after() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(100 + 48, seed=5)
    mgr = manager(params, n_threads=1)
    q = torch.randn(1, H_Q, D, generator=torch.Generator().manual_seed(6))
    try:
        mgr.add_request("r")
        mgr.pause()
        feed(mgr, "r", k, v, n_prompt=100)  # the 48th decode token closes a segment: one swap queued
        before = mgr.attend(["r"], 0, q)
        seen: list[torch.Tensor] = []
        stop, started = threading.Event(), threading.Event()

        def reader() -> None:
            started.set()
            while not stop.is_set():
                seen.append(mgr.attend(["r"], 0, q))
            seen.append(mgr.attend(["r"], 0, q))

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        started.wait()
        mgr.resume()
        mgr.drain()
        stop.set()
        for t in threads:
            t.join()
        after = mgr.attend(["r"], 0, q)
        assert not torch.equal(before, after)  # the swap really changed the stored form
        assert all(torch.equal(s, before) or torch.equal(s, after) for s in seen)
        assert torch.equal(seen[-1], after)
        stream = mgr._stream("r", 0)
        assert stream.snapshot.generation == 1 and not stream.retired  # old temp rows were freed
        owned = {p for st in stream.paged() for p in st.pages}
        assert mgr.pool.used_pages == len(owned)
    finally:
        mgr.close()


def test_retired_pages_wait_for_their_readers() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(100 + 48, seed=7)
    mgr = manager(params, n_threads=1)
    try:
        mgr.add_request("r")
        mgr.pause()
        feed(mgr, "r", k, v, n_prompt=100)
        stream = mgr._stream("r", 0)
        held = stream.acquire()  # an attention step still reading generation 0
        temp_pages = {p for st in held.temp.temp.paged() for p in st.pages}  # type: ignore[union-attr]
        mgr.resume()
        mgr.drain()
        assert stream.retired and (mgr.pool.owners(sorted(temp_pages)) > 0).all()
        q = torch.randn(H_Q, D)
        held.to_kvcache(mgr.method).attend(q)  # still readable: its pages were not reused
        stream.release(held)
        assert not stream.retired and (mgr.pool.owners(sorted(temp_pages)) == 0).all()
    finally:
        mgr.close()


def test_slow_reencoder_keeps_every_token_and_respects_the_backlog_bound() -> None:
    params = dict(SCENARIOS["fixed_len"], segment_len=16, window=8)
    k, v = tokens(40 + 160, seed=8)
    ref = synchronous(params, k, v, n_prompt=40)
    mgr = manager(params, n_layers=2, n_threads=1, max_backlog_tokens=12, reencode_delay_s=0.02)
    try:
        mgr.add_request("r")
        for layer in range(2):
            mgr.prefill("r", layer, k[:40], v[:40])
        for i in range(40, k.shape[0]):
            for layer in range(2):
                mgr.append("r", layer, k[i : i + 1], v[i : i + 1])
        stats = mgr.stats()
        assert stats["cache_backlog_peak"] <= 12
        assert stats["cache_backlog_stalls"] > 0  # the CPU really fell behind
        mgr.drain()
        for layer in range(2):
            assert_same_segments(mgr, "r", ref, layer)
        assert mgr.tokens("r") == k.shape[0]
        assert mgr.stats()["cache_backlog_tokens"] == 0
    finally:
        mgr.close()


def test_free_returns_every_page() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(260, seed=9)
    mgr = manager(params, n_layers=2, n_threads=2)
    try:
        for rid in ("a", "b"):
            mgr.add_request(rid)
            for layer in range(2):
                feed(mgr, rid, k, v, n_prompt=100, layer=layer)
        mgr.drain()
        mgr.fork("a", "c")
        assert mgr.pool.used_pages > 0
        stream = mgr._stream("b", 1)
        held = stream.acquire()
        for rid in ("a", "b", "c"):
            mgr.free(rid)
        assert mgr.pool.used_pages > 0  # b's last snapshot is still being read
        stream.release(held)
        assert mgr.pool.used_pages == 0
        assert mgr.stats()["cache_page_bytes"] == 0 and mgr.stats()["cache_requests"] == 0
    finally:
        mgr.close()


def test_each_request_and_layer_runs_its_own_method() -> None:
    """add_request(methods=...): a per-request fitted keep ratio and a per-layer policy, in one manager."""
    base = SCENARIOS["fixed_len"]
    per_layer = [dict(base, keep_ratio=0.5), dict(base, keep_ratio=0.125, segment_len=32)]
    k, v = tokens(220, seed=12)
    mgr = manager(base, n_layers=2, n_threads=2)
    try:
        mgr.add_request("r", [make_method("mosaic", **p) for p in per_layer])
        mgr.add_request("default")
        for layer in range(2):
            feed(mgr, "r", k, v, n_prompt=100, layer=layer)
            feed(mgr, "default", k, v, n_prompt=100, layer=layer)
        mgr.drain()
        for layer, params in enumerate(per_layer):
            assert_same_segments(mgr, "r", synchronous(params, k, v, n_prompt=100), layer)
            assert_same_segments(mgr, "default", synchronous(base, k, v, n_prompt=100), layer)
        with pytest.raises(ValueError, match="one method per layer"):
            mgr.add_request("x", [make_method("mosaic", **base)])
        with pytest.raises(ValueError, match="'mosaic' only"):
            mgr.add_request("x", [make_method("quest"), make_method("mosaic", **base)])
    finally:
        mgr.close()


def test_callers_in_and_out_of_inference_mode_mix() -> None:
    """An engine prefills under torch.inference_mode (its tensors, the method state included, are
    inference tensors) while the re-encoder threads and other callers run outside it."""
    params = SCENARIOS["fixed_len"]
    k, v = tokens(100 + 2 * 48, seed=13)
    mgr = manager(params, n_threads=1)
    try:
        mgr.add_request("r")
        with torch.inference_mode():
            mgr.prefill("r", 0, k[:100], v[:100])
        for i in range(100, 148):
            mgr.append("r", 0, k[i : i + 1], v[i : i + 1])
        with torch.inference_mode():
            for i in range(148, k.shape[0]):
                mgr.append("r", 0, k[i : i + 1], v[i : i + 1])
        mgr.drain()
        assert_same_segments(mgr, "r", synchronous(params, k, v, n_prompt=100))
        q = torch.randn(1, H_Q, D)
        assert mgr.attend(["r"], 0, q).is_inference()  # called outside the mode, run inside it
    finally:
        mgr.close()


def test_many_concurrent_requests() -> None:
    params = dict(SCENARIOS["fixed_len"], segment_len=24, window=8)
    streams = {f"r{i}": tokens(60 + 90, seed=20 + i) for i in range(6)}
    refs = {rid: synchronous(params, k, v, n_prompt=60) for rid, (k, v) in streams.items()}
    mgr = manager(params, n_threads=2, max_backlog_tokens=16)
    errors: list[BaseException] = []

    def decode(rids: list[str]) -> None:
        try:
            for rid in rids:
                mgr.add_request(rid)
                mgr.prefill(rid, 0, streams[rid][0][:60], streams[rid][1][:60])
            for i in range(60, 150):  # interleaved, like a batch advancing one token per step
                for rid in rids:
                    k, v = streams[rid]
                    mgr.append(rid, 0, k[i : i + 1], v[i : i + 1])
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    try:
        threads = [threading.Thread(target=decode, args=([f"r{2 * j}", f"r{2 * j + 1}"],)) for j in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        mgr.drain()
        for rid, ref in refs.items():
            assert_same_segments(mgr, rid, ref)
        q = torch.randn(6, H_Q, D, generator=torch.Generator().manual_seed(21))
        out = mgr.attend(list(refs), 0, q)
        for b, rid in enumerate(refs):
            assert torch.equal(out[b], mgr.attend([rid], 0, q[b : b + 1])[0])
        assert mgr.stats()["cache_backlog_peak"] <= 16
        for rid in refs:
            mgr.free(rid)
        assert mgr.pool.used_pages == 0
    finally:
        mgr.close()


def test_fork_shares_closed_segments_and_diverges() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(100 + 70, seed=30)
    k2, v2 = tokens(100 + 70, seed=31)
    k2[:130], v2[:130] = k[:130], v[:130]  # same first 130 tokens, then different continuations
    mgr = manager(params, n_threads=1)
    try:
        mgr.add_request("a")
        feed(mgr, "a", k[:130], v[:130], n_prompt=100)
        mgr.drain()
        closed = {p for seg in mgr._stream("a", 0).snapshot.segments for st in seg.paged() for p in st.pages}
        before = mgr.pool.used_pages
        mgr.fork("a", "b")
        temp_pages = {p for st in mgr._stream("b", 0).temp.paged() for p in st.pages}  # type: ignore[union-attr]
        assert mgr.pool.used_pages == before + len(temp_pages)  # closed segments were not copied
        assert (mgr.pool.owners(sorted(closed)) == 2).all()
        for rid, (kk, vv) in (("a", (k, v)), ("b", (k2, v2))):
            for i in range(130, 170):
                mgr.append(rid, 0, kk[i : i + 1], vv[i : i + 1])
        mgr.drain()
        assert_same_segments(mgr, "a", synchronous(params, k, v, 100))
        assert_same_segments(mgr, "b", synchronous(params, k2, v2, 100))
        mgr.free("a")
        assert (mgr.pool.owners(sorted(closed)) == 1).all()
        mgr.free("b")
        assert mgr.pool.used_pages == 0
    finally:
        mgr.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group,keep", [(1, 31), (2, 16), (4, 8)])
def test_stripe_rows_round_trip_across_pages(dtype: torch.dtype, group: int, keep: int) -> None:
    pool = PagePool(1024, torch.device("cpu"), chunk_pages=4)
    x = torch.randn(50, D)
    vals, bits = pack_topk(x, keep, group, None, dtype)
    stripe = PagedStripe(pool, D, group, keep, dtype, block=4)
    stripe.append(vals[:7], bits[:7])  # appends that start and end mid-page
    stripe.append(vals[7:], bits[7:])
    assert (
        stripe.values_offset % 16 == 0
        and stripe.rows_per_page % 4 == 0
        and len(stripe.pages) == -(-50 // stripe.rows_per_page) > 1
    )
    got_v, got_b = stripe.read()
    assert torch.equal(got_v, vals) and torch.equal(got_b, bits)
    part_v, _ = stripe.read(20)
    assert torch.equal(part_v, vals[:20])
    stripe.release()
    assert pool.used_pages == 0


def test_page_ids_are_held_where_the_garbage_collector_does_not_walk() -> None:
    """Page ids sit in arrays, which a full collection does not walk. In lists, the millions of ids
    of a long context made a 200 ms gen-2 collection land in a decode step (bench/decode/README.md)."""
    k, v = tokens(300, seed=3)
    mgr = manager(SCENARIOS["fixed_len"], n_threads=1)
    try:
        mgr.add_request("a")
        feed(mgr, "a", k, v, n_prompt=200)
        mgr.fork("a", "b")
        mgr.drain()
        parts = [st for rid in ("a", "b") for st in mgr._stream(rid, 0).paged()]
        assert any(isinstance(st, PagedBlob) for st in parts) and all(st.pages for st in parts)
        walked = [gc.get_referents(ids) for ids in [st.pages for st in parts] + [mgr.pool._free]]
        assert all(len(refs) <= 1 for refs in walked)  # at most the container's type, never an id
    finally:
        mgr.close()


def test_host_rows_span_chunks_and_chunks_go_back_to_the_pool() -> None:
    """Pending rows pushed across chunk boundaries read back as pushed (a view inside one chunk, a
    copy across several); chunks below a new start, and all of them on reset, return to the pool,
    and the next buffer reuses them."""
    with torch.inference_mode():  # as the manager, which writes its chunks in the mode
        chunks = HostChunks(rows=16, n_heads=H_KV, dim=D, dtype=torch.float32, pin=False)
        k, v = tokens(70, seed=5)
        buf = HostBuffer(chunks)
        buf.reset(100)  # token 100 is the first pending one
        for a, b in ((0, 5), (5, 40), (40, 41), (41, 70)):
            buf.push(k[a:b], v[a:b])
        assert buf.end == 170 and len(buf.chunks) == 5 and chunks.allocated == 5
        for a, b in ((100, 170), (103, 116), (110, 150), (169, 170), (120, 120)):
            got_k, got_v = buf.rows(a, b)
            assert torch.equal(got_k, k[a - 100 : b - 100]) and torch.equal(got_v, v[a - 100 : b - 100])
        view, _ = buf.rows(116, 130)
        assert view.data_ptr() == buf.chunks[1][0, 0].data_ptr()  # inside one chunk: no copy
        buf.release_before(135)  # chunks 0 and 1 hold tokens 100..131 only
        assert len(buf.chunks) == 3 and buf.base == 132 and len(chunks._free) == 2
        assert torch.equal(buf.rows(135, 170)[0], k[35:70])
        buf.reset(0)
        assert len(chunks._free) == 5 and buf.nbytes == 0
        other = HostBuffer(chunks)
        other.push(k[:40], v[:40])
        assert chunks.allocated == 5 and torch.equal(other.rows(0, 40)[1], v[:40])


def test_pending_rows_never_pin_memory_on_the_decode_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager allocates host chunks at start and the re-encoders top them up after each job,
    so an eviction on the decode thread takes a ready chunk (pinning memory on CUDA takes about a
    millisecond per megabyte). Freeing a request gives its chunks back, also when it is freed
    while a re-encoder still reads them (they come back when that job ends)."""
    allocating: list[str] = []
    new = HostChunks._new
    monkeypatch.setattr(
        HostChunks, "_new", lambda self: (allocating.append(threading.current_thread().name), new(self))[1]
    )
    params = SCENARIOS["fixed_len"]
    k, v = tokens(400, seed=6)
    mgr = manager(params, n_threads=1, evict_tokens=8, reencode_delay_s=0.05)
    try:
        assert allocating and all(name == threading.current_thread().name for name in allocating)  # at start
        allocating.clear()
        requests = [f"r{i}" for i in range(3 * SPARE_CHUNKS // 2)]  # each holds a chunk: more than spare
        for rid in requests:
            mgr.add_request(rid)
            mgr.prefill(rid, 0, k[:100], v[:100])
            for i in range(100, 130):  # evictions: the request takes a chunk
                mgr.append(rid, 0, k[i : i + 1], v[i : i + 1])
            mgr.drain()  # its job ran, and the re-encoder topped the pool up after it
        assert len(allocating) >= len(requests) - SPARE_CHUNKS
        assert all(name.startswith("mosaickv-reencode") for name in allocating)
        for rid in requests:
            mgr.free(rid)
        mgr.drain()
        host = mgr._host
        assert mgr.stats()["cache_host_bytes"] == 0 and len(host._free) == host.allocated
        mgr.add_request("s")  # freed in the middle of a slow re-encode
        mgr.prefill("s", 0, k[:100], v[:100])
        for i in range(100, 160):
            mgr.append("s", 0, k[i : i + 1], v[i : i + 1])
        mgr.free("s")
        mgr.drain()
        assert len(host._free) == host.allocated and mgr.stats()["cache_errors"] == 0
    finally:
        mgr.close()


def test_pool_bound_and_errors() -> None:
    pool = PagePool(256, torch.device("cpu"), chunk_pages=2, max_pages=3)
    pages = [pool.allocate() for _ in range(3)]
    with pytest.raises(CacheFull, match="max_pages"):
        pool.allocate()
    pool.release([pages[0]])
    assert pool.allocate() == pages[0]
    pool.release(pages[:0:-1])
    with pytest.raises(ValueError, match="distinct allocated ids"):  # freed twice
        pool.release([pages[1]])
    with pytest.raises(ValueError, match="distinct allocated ids"):  # one id twice in a call
        pool.share([pages[0], pages[0]])
    with pytest.raises(CacheFull, match="max_pages"):  # 3 pages exist, 2 free: all or none
        pool.allocate_many(3)
    assert pool.used_pages == 1 and len(pool.allocate_many(0)) == 0
    got = pool.allocate_many(2).tolist()
    assert got == sorted(got) == sorted(pages[1:])  # ascending, whatever order they were freed in
    with pytest.raises(ValueError, match="multiple of 16"):
        PagePool(1000, torch.device("cpu"))
    with pytest.raises(ValueError, match="raise page_bytes"):
        PagedStripe(PagePool(256, torch.device("cpu")), 256, 1, 128, torch.float32)
    with pytest.raises(ValueError, match="method 'mosaic' only"):
        CacheManager(make_method("quest"), 1, H_KV, D, torch.float32)
    with pytest.raises(ValueError, match="max_backlog_tokens"):
        CacheConfig(max_backlog_tokens=0)
    with pytest.raises(ValueError, match="host_spare_chunks must be >= 0"):
        CacheConfig(host_spare_chunks=-1)
    mgr = manager(SCENARIOS["fixed_len"], n_threads=1)
    try:
        with pytest.raises(ValueError, match="add_request first"):
            mgr.append("nope", 0, *tokens(1, 0))
        mgr.add_request("r")
        with pytest.raises(ValueError, match=r"\[t, 2, 32\] torch.float32"):
            mgr.append("r", 0, torch.zeros(1, 3, D), torch.zeros(1, 3, D))
    finally:
        mgr.close()


def test_the_host_pool_keeps_the_configured_spare_chunks() -> None:
    for spare in (0, 3, SPARE_CHUNKS + 5):
        mgr = manager(SCENARIOS["fixed_len"], n_threads=1, host_spare_chunks=spare)
        try:
            assert len(mgr._host._free) == mgr._host.allocated == spare  # allocated at start, none taken
        finally:
            mgr.close()


def test_kernel_tables_of_a_grown_temporary_segment_address_all_its_pages() -> None:
    """A temporary segment's kernel tables are built on first use, possibly after its stripes grew
    past the table's first region (a close re-packs every token that arrived meanwhile): every page
    must have its entry, or the append kernel and attention would address the wrong rows."""
    mgr = manager(SCENARIOS["fixed_len"], page_bytes=512, n_threads=1)
    try:
        mgr.add_request("r")
        mgr.prefill("r", 0, *tokens(100, 0))
        temp = mgr._stream("r", 0).temp
        assert temp is not None
        with torch.inference_mode():  # as the manager makes and updates its tensors
            temp.append(*tokens(300, 1))  # the CPU path: no table built yet
            tables = temp.tables
        assert max(len(s.pages) for s in temp.k + temp.v) > 16
        for h in range(H_KV):
            for side, stripe in enumerate((temp.k[h], temp.v[h])):
                addr = stripe.pool.addresses(stripe.pages).tolist()
                at = tables._region(h, side)
                assert tables.pages[at : at + len(addr)].tolist() == addr
                values = tables.pages[at + tables.per : at + tables.per + len(addr)].tolist()
                assert values == [a + stripe.values_offset for a in addr]
    finally:
        mgr.close()


def test_kernel_tables_follow_a_temporary_segment_as_it_grows() -> None:
    """Tables built first, then kept current append after append (new pages, the summary tensor
    regrown, the regions doubled): every page's entries, entry 0 the summary tensor now, and each
    head's summary rows at h * capacity of the [H_kv, capacity, width] tensor."""
    mgr = manager(SCENARIOS["fixed_len"] | {"summary": "compact"}, page_bytes=512, n_threads=1)
    col = {name: i for i, name in enumerate(STRIPE_COLS)}
    try:
        mgr.add_request("r")
        mgr.prefill("r", 0, *tokens(100, 0))
        temp = mgr._stream("r", 0).temp
        assert temp is not None
        with torch.inference_mode():
            tables = temp.tables  # built while the segment is empty
            first_summary, first_per = temp.summary.data_ptr(), tables.per
            for i in range(8):
                temp.append(*tokens(40, 10 + i))  # the CPU path: pages added, tables not told
                tables.update()
                cap = temp.summary.shape[1]
                assert tables.pages[0].item() == temp.summary.data_ptr(), f"append {i}"
                for h in range(H_KV):
                    assert tables.rows[h, col["sum_first"]] == h * cap, f"append {i}"
                    assert tables.rows[h, col["sum_rows"]] == H_KV * cap, f"append {i}"
                    for side, stripe in enumerate((temp.k[h], temp.v[h])):
                        addr = stripe.pool.addresses(stripe.pages).tolist()
                        at = tables._region(h, side)
                        assert tables.pages[at : at + len(addr)].tolist() == addr, f"append {i}"
                        values = tables.pages[at + tables.per : at + tables.per + len(addr)].tolist()
                        assert values == [a + stripe.values_offset for a in addr], f"append {i}"
                assert torch.equal(tables.stripes.cpu(), torch.from_numpy(tables.rows))
        assert temp.summary.data_ptr() != first_summary and tables.per > first_per  # both grew
    finally:
        mgr.close()


def interleaved_blocks(
    n_blocks: int, n_layers: int, block_bytes: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A buffer laid out like vLLM's KV cache (block-major: every layer's page of block 0, then of
    block 1, ...) and one strided [n_blocks, block_bytes] uint8 view per layer."""
    buf = torch.zeros(n_blocks, n_layers, block_bytes, dtype=torch.uint8)
    return buf, [buf[:, layer] for layer in range(n_layers)]


def test_pool_over_caller_storage_never_allocates() -> None:
    buf, views = interleaved_blocks(3, 2, 600)  # 2 pages of 256 B per block, 88 B left unused
    pool = PagePool(256, torch.device("cpu"), storage=views)
    assert pool.external and pool.reserved_pages == pool.max_pages == 12
    pages = [pool.allocate() for _ in range(12)]
    with pytest.raises(CacheFull, match="engine's KV cache"):
        pool.allocate()
    for i, page in enumerate(pages):
        pool.page(page).fill_(i + 1)
    # every page is a distinct 256-byte piece of the caller's buffer, none of the per-block tails
    assert sorted(buf[:, :, :512].reshape(-1, 256)[:, 0].tolist()) == list(range(1, 13))
    assert int((buf[:, :, :512] == 0).sum()) == 0 and int(buf[:, :, 512:].sum()) == 0
    pool.release([pages[5]])
    assert pool.allocate() == pages[5]
    with pytest.raises(ValueError, match="one shape"):
        PagePool(256, torch.device("cpu"), storage=[views[0], views[1][:2]])
    with pytest.raises(ValueError, match="holds no page"):
        PagePool(1024, torch.device("cpu"), storage=views)


def test_page_addresses_follow_the_pool_as_it_grows() -> None:
    """The kernels' page addresses stay right when chunks are added between two lookups (the pool
    extends its chunk table with the new chunks only)."""
    pool = PagePool(256, torch.device("cpu"), chunk_pages=2)
    pages: list[int] = []
    for round_size in (1, 3, 4, 1):  # crosses chunk boundaries mid-round and between rounds
        pages += [pool.allocate() for _ in range(round_size)]
        want = [pool.page(p).data_ptr() for p in pages]
        assert pool.addresses(pages).tolist() == want
    assert len({*pool.addresses(pages).tolist()}) == len(pages) == 9


@pytest.mark.parametrize("storage", ["own", "caller"])
@pytest.mark.parametrize("order", ["fresh", "reused"])
def test_whole_pages_written_in_runs_read_back(storage: str, order: str) -> None:
    """Whole pages are written a run of pages per copy (``PagePool.runs``): own chunks of 4 pages,
    or caller blocks of 4 pages each (runs end at a block); pages fresh (in order) or reused after
    holding other bytes, freed in scrambled order (runs of one or two). Rows read back as written,
    and the padding of rows (keep 5 in a stride of 8) reads as zeros."""
    if storage == "own":
        pool = PagePool(256, torch.device("cpu"), chunk_pages=4, max_pages=16)
    else:
        _, views = interleaved_blocks(4, 2, 1100)  # 4 pages of 256 B per block and layer
        pool = PagePool(256, torch.device("cpu"), storage=views)
    if order == "reused":
        held = [pool.allocate() for _ in range(16)]
        for p in held:
            pool.page(p).fill_(255)
        for p in held[1::2] + held[0::2][::-1]:  # one at a time: the free list in this order
            pool.release([p])
    vals, bits = pack_topk(torch.randn(60, D), 5, 1, None, torch.float32)
    stripe = PagedStripe(pool, D, 1, 5, torch.float32)
    wide = torch.zeros(60, 8)
    wide[:, :5] = vals  # rows handed over as a strided view, as a caller's slice may be
    stripe.append(vals[:3], bits[:3])  # a partial page, then whole pages, then a partial one
    stripe.append(wide[3:, :5], bits[3:])
    got_v, got_b = stripe.read()
    assert torch.equal(got_v, vals) and torch.equal(got_b, bits)
    lengths = [b - a for a, b, _ in pool.runs(stripe.pages)]
    assert max(lengths) == (4 if order == "fresh" else 2) and sum(lengths) == len(stripe.pages)
    per, lo = stripe.rows_per_page, stripe.values_offset
    for page in stripe.pages[:-1]:
        rows = pool.page(page)[lo : lo + per * stripe.value_row_bytes].view(torch.float32).view(per, 8)
        assert not rows[:, 5:].any()


def test_blob_round_trip_shares_and_releases() -> None:
    pool = PagePool(256, torch.device("cpu"), chunk_pages=8)
    x = torch.randn(3, 7, 5)  # 420 B: two pages, the second partly used
    blob = PagedBlob(pool, x)
    assert len(blob.pages) == 2 and blob.used_bytes == x.numel() * 4
    assert torch.equal(blob.read(), x)
    twin = blob.shared()
    blob.release()
    assert pool.used_pages == 2 and torch.equal(twin.read(), x)
    twin.release()
    assert pool.used_pages == 0
    small = PagePool(256, torch.device("cpu"), chunk_pages=1, max_pages=1)
    with pytest.raises(CacheFull):
        PagedBlob(small, x)
    assert small.used_pages == 0  # a blob that does not fit gives back what it took


def test_manager_in_caller_storage_holds_every_per_token_byte_there() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(300, seed=11)
    ref = synchronous(params, k, v, n_prompt=100)
    buf, views = interleaved_blocks(64, 2, 4096)
    mgr = CacheManager(
        make_method("mosaic", **params), 2, H_KV, D, torch.float32, "cpu", CacheConfig(page_bytes=1024), views
    )
    try:
        for rid, n in (("short", 100), ("long", 200)):
            mgr.add_request(rid)
            mgr.prefill(rid, 1, k[:n], v[:n])
        # sinks and window are the only tensors outside pages: the same for both prompt lengths
        short, long = mgr.request_stats("short"), mgr.request_stats("long")
        assert short["dense_bytes"] == long["dense_bytes"] and long["page_bytes"] > short["page_bytes"]
        assert mgr.stats()["cache_page_reserved_bytes"] == 2 * 64 * 4096
        mgr.add_request("r")
        feed(mgr, "r", k, v, n_prompt=100, layer=1)
        mgr.drain()
        assert_same_segments(mgr, "r", ref, layer=1)  # rows, rotations and summaries read back from buf
        owners = mgr.pool.owners(range(mgr.pool.reserved_pages))
        used = [mgr.pool.page(p) for p in range(mgr.pool.reserved_pages) if owners[p]]
        assert used and all(t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for t in used)
        for rid in ("short", "long", "r"):
            mgr.free(rid)
        assert mgr.pool.used_pages == 0
    finally:
        mgr.close()


def test_prompts_with_a_common_prefix_share_segments() -> None:
    params = SCENARIOS["fixed_len"]
    k, v = tokens(230, seed=40)
    k2, v2 = tokens(230, seed=41)
    k2[:200], v2[:200] = k[:200], v[:200]
    ids = list(range(230))
    ids2 = ids[:200] + [1000 + i for i in range(30)]  # same first 200 token ids, then different ones
    mgr = manager(params, n_threads=1)
    try:
        mgr.add_request("a")
        mgr.prefill("a", 0, k[:200], v[:200], token_ids=ids[:200])  # segments 48, 48, 48, 36
        alone = mgr.pool.used_pages
        mgr.add_request("b")
        mgr.prefill("b", 0, k2, v2, token_ids=ids2)  # segments 48, 48, 48 (shared), 66 (its own)
        a_segs, b_segs = (mgr._stream(r, 0).snapshot.segments for r in ("a", "b"))
        assert [s.length for s in b_segs] == [48, 48, 48, 66]
        for sa, sb in zip(a_segs[:3], b_segs[:3], strict=True):
            assert [st.pages for st in sa.paged()] == [st.pages for st in sb.paged()]
        own = {p for st in b_segs[3].paged() for p in st.pages}
        assert mgr.pool.used_pages == alone + len(own)
        assert mgr.stats()["cache_prefix_hits"] == 3
        assert_same_segments(mgr, "b", synchronous(params, k2, v2, 230))
        mgr.add_request("c")  # same tokens, different ids: nothing may be shared
        mgr.prefill("c", 0, k[:200], v[:200], token_ids=[i + 1 for i in ids[:200]])
        assert mgr.stats()["cache_prefix_hits"] == 3
        for rid in ("a", "b", "c"):
            mgr.free(rid)
        assert mgr.pool.used_pages == 0 and mgr.stats()["cache_prefix_segments"] == 0
    finally:
        mgr.close()


@pytest.mark.parametrize("storage", ["own", "vllm_interleaved"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_page_tables_address_every_row_summary_and_rotation(name: str, storage: str) -> None:
    """The kernels' tables over a batch of snapshots (closed segments and the temporary one), read
    back through the page table by the addressing rule: exactly the snapshot's segments; in the
    pool's own chunks and in strided caller storage laid out like vLLM's KV cache."""
    params = SCENARIOS[name] | {"token_ratio": 0.5}
    if storage == "own":
        mgr = manager(params, dtype=torch.bfloat16, evict_tokens=4)
    else:
        _, views = interleaved_blocks(96, 2, 2 * 4096 + 112)  # two 4 KiB pages per block and layer
        config = CacheConfig(page_bytes=4096, evict_tokens=4)
        mgr = CacheManager(make_method("mosaic", **params), 1, H_KV, D, torch.bfloat16, "cpu", config, views)
        assert mgr.pool.external
    try:
        for rid, n, prompt, seed in (("a", 230, 120, 0), ("b", 150, 40, 1)):
            mgr.add_request(rid)
            k, v = tokens(n, seed, torch.bfloat16)
            feed(mgr, rid, k, v, prompt)
        mgr.drain()
        mgr.append("b", 0, *tokens(4, 9, torch.bfloat16))  # b's temporary segment grows past the drain
        snaps = [mgr._stream(r, 0).snapshot for r in ("a", "b")]
        lay, ws = snapshot_layout(snaps, [mgr.method] * 2, mgr.pool, gqa_group=4)
        planned = DecodeWorkspace.plan(lay, gqa_group=4)  # sized from the tables read back
        for name in (
            *("qrot", "keys", "sel", "pieces", "n_pieces", "stripe_first", "stripe_pieces"),
            *("arrivals", "part_o", "part_ml", "stripe_out", "stripe_ml"),
        ):
            assert getattr(ws, name).shape == getattr(planned, name).shape, name
        s = 0
        for b, snap in enumerate(snaps):
            core = snap.to_kvcache(mgr.method)
            assert core.segments and snap.temp is not None and snap.temp.length, (
                "closed and temporary segments"
            )
            for h in range(H_KV):
                bh = b * H_KV + h
                assert int(lay.stripe_ptr[bh + 1] - lay.stripe_ptr[bh]) == len(core.segments)
                assert int(lay.block_ptr[bh + 1] - lay.block_ptr[bh]) == core.n_blocks
                for seg in core.segments:
                    assert (
                        int(lay.stripes[s, COL["seq"]]) == b
                        and int(lay.stripes[s, COL["tokens"]]) == seg.length
                    )
                    for side, want in (("k", seg.k), ("v", seg.v)):
                        vals, bits = stripe_side(lay, s, side, torch.bfloat16)
                        assert torch.equal(vals, want.values[h]) and torch.equal(
                            bits, want.bitmaps[h].view(torch.int32)
                        )
                        assert torch.equal(stripe_rotation(lay, s, side), want.rotation[h])
                    assert torch.equal(stripe_summary(lay, s, torch.bfloat16), seg.summary[h])
                    assert torch.equal(
                        lay.block_stripe[lay.stripes[s, COL["block_off"]]], torch.tensor(s, dtype=torch.int32)
                    )
                    s += 1
            for side, sink, tail in (("k", core.sink_k, core.tail_k), ("v", core.sink_v, core.tail_v)):
                dense = torch.cat([sink, tail])  # read where the kernels read it (a batch: in place)
                assert torch.equal(dense_rows(lay, b, side)[:, : dense.shape[0]], dense.transpose(0, 1))
            assert int(lay.dense_len[b]) == dense.shape[0]
        assert lay.dense_rows is not None, "a batch's dense rows are read in place, not stacked"
        assert s == lay.stripes.shape[0]
    finally:
        mgr.close()


def on_the_kernels_path(
    monkeypatch: pytest.MonkeyPatch, mgr: CacheManager, kernel: object, layout: object = None
) -> None:
    """Send ``mgr``'s attention down the kernels' path on the CPU: ``kernel`` stands in for the decode
    launch (the kernel cannot run here), ``layout`` (if given) wraps ``snapshot_layout``."""
    monkeypatch.setattr(manager_module, "run_decode", kernel)
    if layout is not None:
        monkeypatch.setattr(manager_module, "snapshot_layout", layout)
    monkeypatch.setattr(mgr, "_plan_device", types.SimpleNamespace(type="cuda"))


def three_requests(
    seed: int,
) -> tuple[dict[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Prompt lengths of three requests (one of 2 tokens: its sinks fill while decoding), 200 bf16
    tokens of K/V each, and a zero query for the batch."""
    prompts = {"a": 120, "b": 2, "c": 70}
    data = {rid: tokens(200, seed=seed + i, dtype=torch.bfloat16) for i, rid in enumerate(prompts)}
    return prompts, data, torch.zeros(len(prompts), H_Q, D, dtype=torch.bfloat16)


def test_the_kernels_get_each_steps_dense_rows_and_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout ``attend`` hands the decode kernel, step after step of ``append_batch`` + ``attend``
    (steady steps: the held layout, the rows unpublished; rebuilt at evictions, sinks and swaps):
    every sequence's dense rows, read through their addresses, and counts equal those of a manager
    given one ``append`` per request, and its stripes that manager's segments. Nothing reads the
    batched manager's streams during the steps; the ``drain`` before each attention runs the
    evictions ``append_batch`` deferred, and builds the layout of the next attention. The kernel
    cannot run here: a stand-in takes the layout instead."""
    params = SCENARIOS["fixed_len"] | {"token_ratio": 0.5}
    mgr, ref = (manager(params, dtype=torch.bfloat16, evict_tokens=8) for _ in range(2))
    layouts: list[object] = []

    def kernel(layout: object, ws: object, q: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        layouts.append(layout)
        return out

    built_by_drain: list[object] = []  # layouts built with a deferred eviction, for the next attend
    draining = False
    build = manager_module.snapshot_layout

    def spy(*args: object, **kwargs: object) -> object:
        built = build(*args, **kwargs)
        if draining:
            built_by_drain.append(built[0])
        return built

    on_the_kernels_path(monkeypatch, mgr, kernel, spy)
    prompts, data, q = three_requests(seed=40)
    try:
        open_requests((mgr, ref), prompts, data)
        for t in range(60):
            k, v = (torch.stack([data[rid][i][n + t] for rid, n in prompts.items()]) for i in (0, 1))
            mgr.append_batch(list(prompts), 0, k, v)
            for b, rid in enumerate(prompts):
                ref.append(rid, 0, k[b : b + 1], v[b : b + 1])
            draining = True
            for m in (mgr, ref):  # a segment closes in both or neither before attention and the checks
                m.drain()
                m.pause()
            draining = False
            mgr.attend(list(prompts), 0, q)
            lay = layouts[-1]
            for b, rid in enumerate(prompts):
                snap = ref._stream(rid, 0).snapshot
                n = snap.dense.n
                assert int(lay.dense_len[b]) == n, f"step {t}, {rid}"
                for side in ("k", "v"):
                    want = snap.dense.buf[0 if side == "k" else 1, :, :n]
                    assert torch.equal(dense_rows(lay, b, side)[:, :n], want), f"step {t}, {rid}, {side}"
                stripes = int(lay.stripe_ptr[b * H_KV + 1] - lay.stripe_ptr[b * H_KV])
                assert stripes == len(snap.segments) + bool(snap.temp is not None and snap.temp.length)
            for m in (mgr, ref):
                m.resume()
        reused = sum(a is b for a, b in itertools.pairwise(layouts))
        assert 0 < reused < len(layouts) - 1  # reused while nothing changed, rebuilt when a sequence did
        firsts = [b for a, b in itertools.pairwise(layouts) if a is not b]
        prepared = sum(any(lay is x for x in built_by_drain) for lay in firsts)
        assert prepared > 0  # the steps after an eviction attend through the layout built with it
        assert mgr.stats()["cache_steady_attends"] == reused + prepared
    finally:
        mgr.close()
        ref.close()


def test_evictions_wait_for_the_last_layers_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """``append_batch`` writes the row that makes an eviction due like any window row; the eviction
    runs after the last layer's attention, which also builds the next tables of the evicting layer.
    So every attention reads the raw tokens (sinks, then the latest ones) in its dense rows, the
    evicted ones until the step ends; no layer but the last rebuilds its tables in its own call after
    the first step; and after each step every cache holds what one ``append`` per request leaves.
    Re-encoders paused: no swap rebuilds tables. The kernel cannot run here: a stand-in takes the
    layout instead."""
    params = SCENARIOS["fixed_len"] | {"token_ratio": 0.5}
    layers, n_sink = 2, params["n_sink"]
    mgr, ref = (manager(params, layers, torch.bfloat16, evict_tokens=8) for _ in range(2))
    # each attention's dense rows as the kernel would read them at its launch (K, V) per sequence:
    # after it, the eviction may free the buffer they were in (the device reads it first, in order)
    seen: list[list[tuple[torch.Tensor, ...]]] = []
    rebuilt_in: list[tuple[int, int]] = []  # (step, layer) of each attention call that built tables
    where = (0, 0)
    build = manager_module.snapshot_layout

    def spy(*args: object, **kwargs: object) -> object:
        rebuilt_in.append(where)
        return build(*args, **kwargs)

    def kernel(
        lay: DecodeLayout, ws: object, q: torch.Tensor, out: torch.Tensor, scale: float
    ) -> torch.Tensor:
        rows = [int(n) for n in lay.dense_len]
        seen.append(
            [
                tuple(dense_rows(lay, b, side)[:, :n].transpose(0, 1).clone() for side in "kv")
                for b, n in enumerate(rows)
            ]
        )
        return out

    on_the_kernels_path(monkeypatch, mgr, kernel, spy)
    prompts, data, q = three_requests(seed=70)
    longer = 0  # attentions that read a window longer than the other manager's: an eviction waiting
    try:
        for m in (mgr, ref):
            m.pause()
            for rid, n in prompts.items():
                m.add_request(rid)
                for layer in range(layers):
                    m.prefill(rid, layer, data[rid][0][:n], data[rid][1][:n])
        for t in range(60):
            k, v = (torch.stack([data[rid][i][n + t] for rid, n in prompts.items()]) for i in (0, 1))
            for layer in range(layers):
                where = (t, layer)
                mgr.append_batch(list(prompts), layer, k, v)
                for b, rid in enumerate(prompts):
                    ref.append(rid, layer, k[b : b + 1], v[b : b + 1])
                mgr.attend(list(prompts), layer, q)
                for (rid, n), got in zip(prompts.items(), seen[-1], strict=True):
                    rows, total = got[0].shape[0], n + t + 1
                    window = rows - min(n_sink, total)
                    for x, y in zip(got, data[rid], strict=True):
                        assert torch.equal(x[:n_sink], y[: min(n_sink, total)]), f"step {t}, {rid}"
                        assert torch.equal(x[rows - window :], y[total - window : total]), f"step {t}, {rid}"
                    want = ref._stream(rid, layer).snapshot.dense.n
                    assert rows >= want, f"step {t}, {rid}"
                    longer += rows > want
            for layer in range(layers):  # the step is over: both managers hold the same caches
                for rid in prompts:
                    a, b = mgr._stream(rid, layer).snapshot, ref._stream(rid, layer).snapshot
                    assert a.dense.n == b.dense.n and torch.equal(
                        a.dense.buf[:, :, : a.dense.n], b.dense.buf[:, :, : b.dense.n]
                    )
                    assert (a.temp.length if a.temp else 0) == (b.temp.length if b.temp else 0)
        assert longer > 0 and mgr.stats()["cache_deferred_evictions"] > 0
        assert all(step == 0 or layer == layers - 1 for step, layer in rebuilt_in), rebuilt_in
        mgr.resume()
        ref.resume()
        mgr.drain()
        ref.drain()
        for rid in prompts:
            for layer in range(layers):
                with mgr.view(rid, layer) as got, ref.view(rid, layer) as want:
                    assert [s.length for s in got.segments] == [s.length for s in want.segments]
                    for x, y in ((got.tail_k, want.tail_k), (got.tail_v, want.tail_v)):
                        assert torch.equal(x, y)
    finally:
        mgr.close()
        ref.close()


def test_a_due_eviction_runs_before_a_fork_and_goes_with_a_freed_request() -> None:
    """An eviction ``append_batch`` made due, before any attention ran it: ``fork`` runs it first (the
    twin holds what the request holds), and one of a request freed meanwhile is dropped with it (the
    next run of the due evictions skips it). Every request then holds what one ``append`` per request
    leaves."""
    params = SCENARIOS["fixed_len"]
    prompts = {"a": 100, "b": 60, "c": 57}
    data = {rid: tokens(200, seed=80 + i) for i, rid in enumerate(prompts)}
    batched, single = (manager(params, n_threads=2, evict_tokens=8) for _ in range(2))
    t = 0

    def step_until_due(rids: list[str]) -> list[str]:
        """Steps of ``rids`` until one has an eviction due in the batched manager; those that have."""
        nonlocal t
        while True:
            k, v = (torch.stack([data[rid][i][prompts[rid] + t] for rid in rids]) for i in (0, 1))
            batched.append_batch(rids, 0, k, v)
            for b, rid in enumerate(rids):
                single.append(rid, 0, k[b : b + 1], v[b : b + 1])
            t += 1
            due = [rid for rid in rids if batched._stream(rid, 0).due_tokens()]
            if due:
                return due

    try:
        open_requests((batched, single), prompts, data)
        due = step_until_due(["a", "b", "c"])
        ran = batched.stats()["cache_deferred_evictions"]
        for mgr in (batched, single):
            mgr.fork(due[0], "twin")
        assert batched.stats()["cache_deferred_evictions"] == ran + len(due)  # the fork ran them
        gone = step_until_due(["a", "b", "c"])[0]
        for mgr in (batched, single):
            mgr.free(gone)
        batched.drain(timeout=60)  # runs what is still due: nothing of the freed request (whose job
        single.drain(timeout=60)  # no re-encoder would ever take: drain would wait for it)
        left = [rid for rid in ("a", "b", "c", "twin") if rid != gone]
        for rid in left:
            with batched.view(rid, 0) as got, single.view(rid, 0) as want:
                assert got.length == want.length, rid
                for x, y in ((got.sink_k, want.sink_k), (got.tail_k, want.tail_k), (got.tail_v, want.tail_v)):
                    assert torch.equal(x, y), rid
                assert [s.length for s in got.segments] == [s.length for s in want.segments]
        for rid in left:
            batched.free(rid)
        assert batched.pool.used_pages == 0  # nothing was evicted into a freed request's pages
    finally:
        batched.close()
        single.close()


def test_steady_steps_keep_every_row_through_a_free_and_a_changed_batch() -> None:
    """Rows written by steady steps (unpublished) survive what ends the steady batch: a request of
    the batch freed, the batch changing, a prefill of another request. Afterwards every request
    holds exactly what one ``append`` per request leaves."""
    params = SCENARIOS["fixed_len"]
    prompts = {"a": 100, "b": 60, "c": 57}
    data = {rid: tokens(200, seed=50 + i) for i, rid in enumerate(prompts)}
    batched, single = (manager(params, n_threads=2, evict_tokens=8) for _ in range(2))

    def step(rids: list[str], t: int) -> None:
        k, v = (torch.stack([data[rid][i][prompts[rid] + t] for rid in rids]) for i in (0, 1))
        batched.append_batch(rids, 0, k, v)
        for b, rid in enumerate(rids):
            single.append(rid, 0, k[b : b + 1], v[b : b + 1])

    try:
        open_requests((batched, single), prompts, data)
        for t in range(20):
            step(["a", "b", "c"], t)
        steady = batched.stats()["cache_steady_appends"]
        assert steady > 0
        for mgr in (batched, single):
            mgr.free("b")
        for t in range(20, 40):
            step(["a", "c"], t)
        assert batched.stats()["cache_steady_appends"] > steady  # the new batch went steady too
        for mgr in (batched, single):
            mgr.add_request("d")
            mgr.prefill("d", 0, data["b"][0][:30], data["b"][1][:30])
        for t in range(40, 50):
            step(["c", "a"], t)
        batched.drain()
        single.drain()
        for rid in ("a", "c", "d"):
            with batched.view(rid, 0) as got, single.view(rid, 0) as want:
                assert got.length == want.length
                for x, y in ((got.sink_k, want.sink_k), (got.tail_k, want.tail_k), (got.tail_v, want.tail_v)):
                    assert torch.equal(x, y), rid
                assert [s.length for s in got.segments] == [s.length for s in want.segments]
        assert batched.tokens("a") == prompts["a"] + 50
    finally:
        batched.close()
        single.close()


def test_a_steady_layout_keeps_the_pages_it_reads_until_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap while attention's held layout still shows the old temporary segment: its pages stay
    allocated (the layout may be launched once more before the next step sees the swap) and go back
    when the next ``attend`` rebuilds the layout."""
    params = SCENARIOS["fixed_len"] | {"token_ratio": 0.5}
    mgr = manager(params, dtype=torch.bfloat16, evict_tokens=8, n_threads=1)
    monkeypatch.setattr(manager_module, "run_decode", lambda layout, ws, q, out, scale: out)
    monkeypatch.setattr(mgr, "_plan_device", types.SimpleNamespace(type="cuda"))  # the kernels' path
    k, v = tokens(300, seed=60, dtype=torch.bfloat16)
    q = torch.zeros(1, H_Q, D, dtype=torch.bfloat16)
    try:
        mgr.add_request("r")
        mgr.prefill("r", 0, k[:100], v[:100])
        mgr.pause()
        stream = mgr._stream("r", 0)
        t = 100
        while sum(n for n, _ in stream.jobs) < params["segment_len"]:  # queued: at least one close
            mgr.append_batch(["r"], 0, k[t : t + 1], v[t : t + 1])
            mgr.attend(["r"], 0, q)
            t += 1
        mgr.append_batch(["r"], 0, k[t : t + 1], v[t : t + 1])  # a steady step after the eviction
        mgr.attend(["r"], 0, q)  # builds and holds the layout over the temporary segment
        assert mgr.stats()["cache_steady_appends"] > 0
        temp = stream.snapshot.temp
        assert temp is not None and temp.length
        temp_pages = sorted({p for st in temp.temp.paged() for p in st.pages})
        mgr.resume()
        mgr.drain()  # the close swaps in and retires the temporary segment
        assert stream.snapshot.generation > 0
        assert (mgr.pool.owners(temp_pages) > 0).all()
        mgr.attend(["r"], 0, q)  # sees the swap: a new layout; the old snapshot is released
        assert (mgr.pool.owners(temp_pages) == 0).all()
    finally:
        mgr.close()


def test_a_dense_batch_describes_its_buffers_until_one_changes() -> None:
    """The device table of a batch's dense rows: each buffer's K and V addresses, row counts and
    skip marks; reused only for the same buffers with as many rows and nothing to skip."""
    cpu = torch.device("cpu")
    rows = [DenseRows(DenseRows.empty(H_KV, D, torch.bfloat16, cpu, 10).buf, 0, n) for n in (3, 0, 7)]
    batch = DenseBatch(rows, skip=[False, True, False])
    for b, r in enumerate(rows):
        assert int(batch.rows[0, b]) == r.buf[0].data_ptr() and int(batch.rows[1, b]) == r.buf[1].data_ptr()
    assert batch.lengths.tolist() == [3, 0, 7] and batch.skip.tolist() == [0, 1, 0] and batch.cap == 10
    assert batch.matches(rows)
    assert not batch.matches([rows[0], rows[1], DenseRows(rows[2].buf, 0, 8)])  # a row more
    assert not batch.matches([rows[0], rows[1], rows[2].copy()])  # another buffer
    assert dense_batch(rows, batch) is batch
    assert dense_batch(rows, batch, skip=[True, False, False]) is not batch  # marks need a new table
    assert dense_batch(rows[:1]) is None  # one sequence: its buffer as it is, for attention
    assert dense_batch(rows[:1], single=True) is not None  # an append's table serves the next steps
    assert dense_batch(rows[:1], DenseBatch(rows[:1])) is not None  # held: the device count is current
    assert dense_batch([rows[0], DenseRows.empty(H_KV, D, torch.bfloat16, cpu, 12)]) is None  # stacked


def test_attention_reads_pages_in_place_only_when_no_row_straddles_a_page() -> None:
    """Summary rows of 16 bf16 channels (32 B) and rotation rows (4 D B) divide a 4 KiB page; 24
    channels (48 B) do not, and a cache that attends every block has no summaries to score: those
    two take the gathered copy."""
    pool = PagePool(4096, torch.device("cpu"))
    readable = {
        ch: pages_readable(
            make_method("mosaic", summary="compact", summary_channels=ch), 128, torch.bfloat16, pool
        )
        for ch in (16, 24)
    }
    assert readable == {16: True, 24: False}
    assert not pages_readable(make_method("mosaic", token_ratio=1.0), 128, torch.bfloat16, pool)


def test_a_snapshots_dense_rows_never_change_under_it() -> None:
    """Sinks and window live in one buffer per stream that appends write in place: an older
    snapshot keeps the rows it saw through later appends, evictions and a fork's appends."""
    params = SCENARIOS["fixed_len"]
    mgr = manager(params, evict_tokens=4)
    try:
        mgr.add_request("a")
        k, v = tokens(160, 3)
        feed(mgr, "a", k[:100], v[:100], 60)
        old = mgr._stream("a", 0).snapshot
        seen = (old.dense.sink_k.clone(), old.dense.window_k.clone(), old.dense.window_v.clone())
        assert torch.equal(seen[1], k[100 - seen[1].shape[0] : 100])
        for i in range(100, 130):  # past several evictions
            mgr.append("a", 0, k[i : i + 1], v[i : i + 1])
        mgr.fork("a", "b")
        for i in range(130, 160):
            mgr.append("b", 0, k[i : i + 1], v[i : i + 1])
        now = mgr._stream("a", 0).snapshot
        assert torch.equal(old.dense.sink_k, seen[0]) and torch.equal(old.dense.window_k, seen[1])
        assert torch.equal(old.dense.window_v, seen[2])
        window = now.dense.window_k
        assert torch.equal(window, k[130 - window.shape[0] : 130]), "the fork wrote into a's rows"
        assert window.shape[0] <= params["window"] + 3
    finally:
        mgr.close()


def test_a_rebuilt_layout_keeps_the_workspace_while_it_fits() -> None:
    """After an eviction (one more block per head) the layer's workspace is reused when the grid-
    sizing buffers keep their shapes; another GQA group, or buffers too small, get new ones."""
    mgr = manager(SCENARIOS["fixed_len"] | {"token_ratio": 0.5}, dtype=torch.bfloat16, evict_tokens=4)
    try:
        mgr.add_request("a")
        k, v = tokens(200, 5, torch.bfloat16)
        feed(mgr, "a", k[:150], v[:150], 100)
        snaps = [mgr._stream("a", 0).snapshot]
        _, ws1 = snapshot_layout(snaps, [mgr.method], mgr.pool, gqa_group=4)
        reused = 0
        for i in range(150, 200, 4):
            mgr.append("a", 0, k[i : i + 4], v[i : i + 4])  # 4 tokens leave the window: a block per head
            lay2, ws2 = snapshot_layout([mgr._stream("a", 0).snapshot], [mgr.method], mgr.pool, 4, reuse=ws1)
            fresh = DecodeWorkspace.plan(lay2, gqa_group=4)  # sized from the tables read back
            grid = ("sel", "pieces", "stripe_out")
            same_grid = all(getattr(ws1, n).shape == getattr(fresh, n).shape for n in grid)
            n_blocks, n_stripes = lay2.block_stripe.numel(), lay2.stripes.shape[0]
            fits = ws1.keys.numel() >= n_blocks and ws1.qrot.shape[0] >= n_stripes
            assert (ws2 is ws1) == (same_grid and fits)
            for n in grid + ("part_o", "part_ml", "n_pieces", "stripe_ml"):
                assert getattr(ws2, n).shape == getattr(fresh, n).shape, n
            assert ws2.keys.numel() >= n_blocks and ws2.qrot.shape[0] >= n_stripes
            reused += ws2 is ws1
            ws1 = ws2
        assert 0 < reused < len(range(150, 200, 4)), "both branches: reused, and grown past the old grid"
        _, ws8 = snapshot_layout([mgr._stream("a", 0).snapshot], [mgr.method], mgr.pool, 8, reuse=ws1)
        assert ws8 is not ws1 and ws8.qrot.shape[1] == 8
    finally:
        mgr.close()


def test_a_job_of_a_freed_request_stops_at_its_next_close() -> None:
    """free() can land while a re-encoder is inside a job that runs past a segment's end: the close
    then finds the stream freed and publishes nothing, and the job must end there (it used to fold
    zero tokens and re-encode the same segment forever, holding a thread). The job runs here on
    its own thread, with the pool paused, after the request was freed."""
    mgr = manager(SCENARIOS["fixed_len"], n_threads=1, evict_tokens=4)  # 48-token segments
    try:
        mgr.add_request("a")
        k, v = tokens(160, 7)
        mgr.prefill("a", 0, k[:60], v[:60])
        mgr.pause()
        mgr.append("a", 0, k[60:160], v[60:160])  # one job of 100 tokens: closes at 48 and 96
        stream = mgr._stream("a", 0)
        n, event = stream.jobs[0]
        assert n > SCENARIOS["fixed_len"]["segment_len"]
        mgr.free("a")
        failed: list[BaseException] = []

        def run_job() -> None:
            try:
                with torch.inference_mode():  # as the re-encoder threads run
                    stream.process(n, event)
            except BaseException as err:  # noqa: BLE001 - reported below
                failed.append(err)

        job = threading.Thread(target=run_job, daemon=True)
        job.start()
        job.join(timeout=30)
        assert not job.is_alive(), "the job kept re-encoding a freed request"
        assert not failed and stream.reencodes == 0
    finally:
        mgr.resume()
        mgr.close()


def test_a_batch_whose_dense_buffers_differ_in_size_is_padded_into_one() -> None:
    """Requests whose methods keep different windows have dense buffers of different sizes: the
    layout pads them into one [B, H_kv, cap, D] tensor, each sequence's sinks then window first."""
    base = SCENARIOS["fixed_len"] | {"token_ratio": 0.5}
    mgr = manager(base, dtype=torch.bfloat16, evict_tokens=4)
    try:
        mgr.add_request("wide")
        mgr.add_request("narrow", [make_method("mosaic", **(base | {"window": 8}))])
        fed = {rid: tokens(130, seed, torch.bfloat16) for rid, seed in (("wide", 1), ("narrow", 2))}
        for rid, (k, v) in fed.items():
            feed(mgr, rid, k, v, 100)
        snaps = [mgr._stream(r, 0).snapshot for r in fed]
        assert snaps[0].dense.cap != snaps[1].dense.cap
        lay, _ = snapshot_layout(snaps, [mgr._stream(r, 0).method for r in fed], mgr.pool, 4)
        for b, (snap, (k, v)) in enumerate(zip(snaps, fed.values(), strict=True)):
            n, n_sink = snap.dense.n, base["n_sink"]
            assert int(lay.dense_len[b]) == n
            for got, x in ((lay.dense_k[b, :, :n], k), (lay.dense_v[b, :, :n], v)):  # sinks, then the newest
                assert torch.equal(got, torch.cat([x[:n_sink], x[130 - (n - n_sink) :]]).transpose(0, 1))
    finally:
        mgr.close()
