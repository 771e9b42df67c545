"""The hf engine's mosaickv backend through the cache manager (cache=manager) against the core path
(cache=core), on the embedded SmolLM2-135M (30 layers, 3 KV heads, head_dim 64, float32 on CPU).

Oracle: in a lossless setting (keep every element, attend every block) both paths compute the same
attention up to float rounding, so greedy decoding must give the same tokens. With keep_ratio < 1
they differ by design while decode tokens are pending: the manager packs them into the temporary
segment with the previous segment's strategy, the core keeps them dense (docs/CACHE.md).
"""

from __future__ import annotations

import queue

import pytest

from mosaickv.engines.base import Event, Failed, Finished, GenerateRequest, SamplingParams, TokenChunk
from mosaickv.engines.hf.backends import make_backend
from mosaickv.engines.hf.engine import HFEngine
from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend
from mosaickv.protocol import MosaicError

# 4 sinks, 16-token segments, an 8-token window: the ~200-token prompt closes a dozen segments at
# prefill. Decode tokens leave the window 8 at a time (the engine's evict_tokens), each layer's
# first block up to 7 tokens early (the manager staggers its layers), so every layer has 16 pending
# tokens by decode step 24 and closes one segment on the CPU. max_backlog_tokens=1 makes
# each eviction wait for the re-encoder to finish the previous job, so every close and its swap
# happen inside the 28 steps, every run.
LOSSLESS = {"keep_ratio": "1.0", "token_ratio": "1.0", "n_sink": "4", "window": "8", "segment_len": "16"}
MANAGER = {"cache": "manager", "cache_threads": "1", "max_backlog_tokens": "1"}
NEW_TOKENS = 28
PROMPT = " ".join(
    f"Note {i}: the {colour} box on shelf {i % 7} holds {i * 3} marbles."
    for i, colour in enumerate(["red", "green", "blue", "amber", "violet", "grey"] * 2)
)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(
    engine: HFEngine, request_id: str, max_tokens: int, cancel_after: int | None = None, prompt: str = PROMPT
) -> tuple[list[int], Finished]:
    """Greedy tokens and the Finished event of one request; cancelled after `cancel_after` chunks."""
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    request = GenerateRequest(
        request_id, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), prompt=prompt
    )
    engine.submit(request, lambda _rid, event: events.put(event))
    tokens: list[int] = []
    while True:
        event = events.get(timeout=300)
        if isinstance(event, TokenChunk):
            tokens.extend(event.token_ids)
            if cancel_after is not None and len(tokens) == cancel_after:
                engine.cancel(request_id)
        else:
            assert not isinstance(event, Failed), event.error
            assert isinstance(event, Finished)
            return tokens, event


def test_manager_decodes_like_the_core_cache_and_frees_its_pages() -> None:
    results = {}
    for cache in ("core", "manager"):
        options = {**LOSSLESS, **(MANAGER if cache == "manager" else {"cache": "core"})}
        engine = HFEngine("smollm2-135m", backend="mosaickv", backend_options=options)
        try:
            assert 180 <= len(engine.tokenizer(PROMPT).input_ids) <= 260
            results[cache] = run(engine, cache, NEW_TOKENS)
            stats = engine.stats()
            if cache == "core":
                assert not any(key.startswith("cache_") for key in stats)
                continue
            # one decode-time close per layer, re-encoded on the CPU and swapped in
            assert stats["cache_reencodes"] == engine.model.config.num_hidden_layers
            # max_backlog_tokens 1: one eviction at a time, a block of 8 tokens (evict_tokens' default)
            assert stats["cache_backlog_peak"] <= 8 and stats["cache_errors"] == 0
            assert stats["cache_requests"] == 0 and stats["cache_pages_used"] == 0
            assert stats["cache_page_bytes"] == 0 and stats["cache_host_bytes"] == 0
            assert stats["cache_page_reserved_bytes"] > 0  # the pool kept its memory for reuse

            # a cancelled request gives its pages back too (engine.close cancels the same way)
            tokens, done = run(engine, "cancelled", 50, cancel_after=3)
            assert done.finish_reason == "cancelled" and 3 <= len(tokens) < 50
            assert engine.stats()["cache_pages_used"] == 0
        finally:
            engine.close()
    (core_tokens, core_done), (mgr_tokens, mgr_done) = results["core"], results["manager"]
    assert len(mgr_tokens) == NEW_TOKENS
    assert mgr_tokens == core_tokens
    # done.kv_bytes: the request's real device bytes after prefill (pages + dense tensors), the
    # same order as the core cache's tensors (pages round rows up, the core also counts its state).
    # Both are far above the dense size here: keep 1.0 and a D x D rotation pair per 16 tokens.
    assert 0.8 < mgr_done.kv_bytes / core_done.kv_bytes < 1.5, (mgr_done.kv_bytes, core_done.kv_bytes)


def test_budget_ratio_is_met_on_the_managers_pages() -> None:
    """The fit measures the pages the manager allocates (rows padded to the kernels' stride of 8,
    whole pages), not the core layout: fitted on the core layout, a manager-held cache at budget 3
    measured 2.26x less than dense instead of 3x (docs/CACHE.md)."""
    options = {"budget_ratio": "2", "token_ratio": "1.0", "segment_len": "1024", **MANAGER}
    engine = HFEngine("smollm2-135m", backend="mosaickv", backend_options=options)
    try:
        _, done = run(engine, "budget", 1, prompt=PROMPT * 4)
    finally:
        engine.close()
    assert done.prompt_tokens > 700
    # full_kv_bytes: the dense cache of the same prompt, from the model's shape (2 x layers x KV heads
    # x head_dim x 4 bytes per token). Kept values come in rows of 8, so the fit steps in eighths of a
    # row: it lands under the budget but not far under it.
    assert done.full_kv_bytes / 2.6 < done.kv_bytes <= done.full_kv_bytes / 2


def test_cache_options_are_checked() -> None:
    backend = make_backend("mosaickv", {"method": "mosaic"})
    assert isinstance(backend, MosaicKVBackend) and backend.cache_config is not None
    assert make_backend("mosaickv", {"method": "quest"}).cache_config is None  # type: ignore[attr-defined]
    bad = [
        ({"method": "quest", "cache": "manager"}, "stores method mosaic only"),
        ({"cache": "core", "cache_threads": "2"}, "options of cache=manager"),
        ({"cache": "paged"}, "cache must be manager or core"),
        ({"cache_threads": "0"}, "n_threads must be >= 1"),
        ({"max_backlog_tokens": "many"}, "max_backlog_tokens must be an integer"),
    ]
    for options, message in bad:
        with pytest.raises(MosaicError, match=message):
            make_backend("mosaickv", options)
