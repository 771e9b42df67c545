"""The hf engine on tiny-random (a real Llama architecture with random weights): our decode loop
against transformers' own `generate`, real KV bytes, sampling, stop strings, streaming text,
cancellation, interleaved requests and errors."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator

import pytest
import torch

from mosaickv.engines.base import Event, Failed, Finished, GenerateRequest, SamplingParams, TokenChunk
from mosaickv.engines.hf.backends import KVBackend
from mosaickv.engines.hf.decode import Detokenizer, StopMatcher
from mosaickv.engines.hf.engine import HFEngine
from mosaickv.protocol import MosaicError

PROMPT = "The quick brown fox jumps over the lazy dog"
# tiny-random: 2 layers x 2 KV heads x head_dim 16, float32, K and V: 2 * 2 * 2 * 16 * 4 bytes per token.
TINY_KV_BYTES_PER_TOKEN = 512


@pytest.fixture(scope="module")
def engine() -> Iterator[HFEngine]:
    eng = HFEngine("tiny-random", max_inflight=3)
    yield eng
    eng.close()


class Collector:
    """An EventSink that records events per request and signals when each request ends."""

    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}
        self.order: list[str] = []  # request id of every event, in arrival order
        self.ended: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def __call__(self, request_id: str, event: Event) -> None:
        with self._lock:
            self.events.setdefault(request_id, []).append(event)
            self.order.append(request_id)
        if isinstance(event, (Finished, Failed)):
            self.ended.put(request_id)

    def wait(self, n: int = 1, timeout: float = 60.0) -> None:
        for _ in range(n):
            self.ended.get(timeout=timeout)

    def tokens(self, request_id: str) -> list[int]:
        return [t for e in self.events[request_id] if isinstance(e, TokenChunk) for t in e.token_ids]

    def text(self, request_id: str) -> str:
        return "".join(e.text for e in self.events[request_id] if isinstance(e, TokenChunk))

    def end(self, request_id: str) -> Event:
        return self.events[request_id][-1]


def run(engine: HFEngine, request: GenerateRequest) -> Collector:
    sink = Collector()
    engine.submit(request, sink)
    sink.wait()
    return sink


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_greedy_matches_transformers_generate(engine: HFEngine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    sink = run(engine, GenerateRequest("g", greedy(24), token_ids=ids))
    config = copy.deepcopy(engine.model.generation_config)
    config.eos_token_id, config.max_new_tokens, config.do_sample = None, 24, False
    reference = engine.model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids) :].tolist()
    assert sink.tokens("g") == reference
    assert len(set(reference)) > 5  # a meaningful comparison, not one token repeated
    end = sink.end("g")
    assert isinstance(end, Finished) and end.finish_reason == "length"
    assert (end.prompt_tokens, end.completion_tokens) == (len(ids), 24)


def test_kv_bytes_are_the_real_cache_storage(engine: HFEngine) -> None:
    ids = list(range(1000, 1037))
    end = run(engine, GenerateRequest("kv", greedy(2), token_ids=ids)).end("kv")
    assert isinstance(end, Finished)
    assert end.kv_bytes == TINY_KV_BYTES_PER_TOKEN * len(ids)
    assert end.full_kv_bytes == TINY_KV_BYTES_PER_TOKEN * len(ids)


def test_logprobs_match_a_full_forward_pass(engine: HFEngine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    sink = run(engine, GenerateRequest("lp", greedy(6, logprobs=True), token_ids=ids))
    got = [lp for e in sink.events["lp"] if isinstance(e, TokenChunk) for lp in (e.logprobs or ())]
    generated = sink.tokens("lp")
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + generated])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    expected = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(generated)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_seeded_sampling_repeats_and_top_p_near_zero_is_greedy(engine: HFEngine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a = run(engine, GenerateRequest("s1", sampled, token_ids=ids)).tokens("s1")
    b = run(engine, GenerateRequest("s2", sampled, token_ids=ids)).tokens("s2")
    other = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    c = run(engine, GenerateRequest("s3", other, token_ids=ids)).tokens("s3")
    assert a == b and a != c
    nucleus = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-9, seed=5, ignore_eos=True)
    d = run(engine, GenerateRequest("s4", nucleus, token_ids=ids)).tokens("s4")
    g = run(engine, GenerateRequest("s5", greedy(12), token_ids=ids)).tokens("s5")
    assert d == g


def test_stop_string_ends_the_request_and_is_not_streamed(engine: HFEngine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    full = run(engine, GenerateRequest("f", greedy(16), token_ids=ids)).text("f")
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sink = run(engine, GenerateRequest("st", greedy(16, stop=(stop,)), token_ids=ids))
    end = sink.end("st")
    assert isinstance(end, Finished) and end.finish_reason == "stop"
    assert sink.text("st") == full[: full.index(stop)]


def test_chat_messages_use_the_chat_template(engine: HFEngine) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    sink = run(engine, GenerateRequest("chat", greedy(3), messages=messages))
    expected = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    end = sink.end("chat")
    assert isinstance(end, Finished)
    assert end.prompt_tokens == len(engine.tokenizer(expected, add_special_tokens=False).input_ids)
    assert "<|im_start|>assistant" in expected


def test_cancel_stops_a_running_request(engine: HFEngine) -> None:
    sink = Collector()
    engine.submit(GenerateRequest("c", greedy(4000), prompt=PROMPT), sink)
    while "c" not in sink.events:
        threading.Event().wait(0.01)
    engine.cancel("c")
    sink.wait()
    end = sink.end("c")
    assert isinstance(end, Finished) and end.finish_reason == "cancelled"
    assert 0 < end.completion_tokens < 4000
    assert engine.inflight() == 0 and engine.kv_bytes() == 0


def test_interleaved_requests_equal_solo_runs(engine: HFEngine) -> None:
    prompts = [PROMPT, "Once upon a time", "1 2 3 4 5"]
    solo = [
        run(engine, GenerateRequest(f"solo{i}", greedy(8), prompt=p)).tokens(f"solo{i}")
        for i, p in enumerate(prompts)
    ]
    sink = Collector()
    # Holding the scheduler's (reentrant) lock while submitting makes all three requests part of the
    # scheduler's first turn, whatever the machine's load: the order below is then deterministic.
    with engine._cv:
        for i, p in enumerate(prompts):
            engine.submit(GenerateRequest(f"mix{i}", greedy(8), prompt=p), sink)
    sink.wait(3)
    assert [sink.tokens(f"mix{i}") for i in range(3)] == solo
    # Round robin: the requests' first chunks arrive before any of them finishes.
    assert set(sink.order[:3]) == {"mix0", "mix1", "mix2"}


def test_overload_and_invalid_requests_are_refused(engine: HFEngine) -> None:
    sink = Collector()
    for i in range(3):
        engine.submit(GenerateRequest(f"busy{i}", greedy(4000), prompt=PROMPT), sink)
    with pytest.raises(MosaicError) as info:
        engine.submit(GenerateRequest("one-too-many", greedy(4), prompt=PROMPT), sink)
    assert info.value.code == "overloaded"
    for i in range(3):
        engine.cancel(f"busy{i}")
    sink.wait(3)
    cases = [
        (GenerateRequest("long", SamplingParams(max_tokens=8192), prompt=PROMPT), "context_too_long"),
        (GenerateRequest("oov", greedy(1), token_ids=[5, 10**6]), "bad_request"),
        (GenerateRequest("empty", greedy(1), prompt=""), "bad_request"),
    ]
    for request, code in cases:
        with pytest.raises(MosaicError) as info:
            engine.submit(request, sink)
        assert info.value.code == code


class FailingBackend(KVBackend):
    """A fault injected on purpose (test double): the stock cache, but encoding after prefill
    raises for prompts of exactly 3 tokens."""

    def end_prefill(self, cache: object) -> None:
        if cache.get_seq_length() == 3:
            raise RuntimeError("injected fault")


def test_engine_error_ends_only_that_request(engine: HFEngine) -> None:
    stock = engine._backend  # swapped for this test only: there is no public way to inject a fault
    engine._backend = FailingBackend({})
    try:
        sink = Collector()
        engine.submit(GenerateRequest("bad", greedy(3), token_ids=[10, 11, 12]), sink)
        engine.submit(GenerateRequest("good", greedy(3), token_ids=[10, 11, 12, 13]), sink)
        sink.wait(2)
    finally:
        engine._backend = stock
    failed = sink.end("bad")
    assert isinstance(failed, Failed) and failed.error.code == "engine_error"
    assert "injected fault" in failed.error.message
    assert isinstance(sink.end("good"), Finished)
    assert engine.stats()["failures"] >= 1


def test_detokenizer_streams_multibyte_text_exactly(engine: HFEngine) -> None:
    text = "Grüße, 世界! 🙂 naïve café"
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    detok = Detokenizer(engine.tokenizer)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize(
    ("deltas", "stops", "expected_out", "expected_stop"),
    [
        (["Hel", "lo wor", "ld"], ["wor"], ["Hel", "lo ", ""], [False, True, None]),
        (["ab", "c", "d"], ["cx"], ["ab", "", "cd"], [False, False, False]),
        (["a<", "/s", ">b"], ["</s>"], ["a", "", ""], [False, False, True]),
        (["xyz"], [], ["xyz"], [False]),
    ],
)
def test_stop_matcher_holds_back_possible_stops(
    deltas: list[str], stops: list[str], expected_out: list[str], expected_stop: list[bool | None]
) -> None:
    matcher = StopMatcher(stops)
    for delta, out, stopped in zip(deltas, expected_out, expected_stop, strict=True):
        if stopped is None:  # the request already ended at the previous delta
            break
        assert matcher.push(delta) == (out, stopped)
