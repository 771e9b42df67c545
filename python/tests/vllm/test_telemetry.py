"""Planner telemetry from the vLLM impl to the worker (engines/vllm/telemetry.py), with real sockets
and a real second process: the test binds the worker's ``TelemetryRelay`` (a PULL socket on ipc://)
and runs ``telemetry_child.py`` as the engine-core process, whose real vLLM Attention layers on the
MosaicKV backend prefill three prompts with ``telemetry_every=2`` and then decode four steps with
``recall_every=3``."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import telemetry_child as child
import torch
import zmq

from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.engines.vllm.config import ENV_VAR, MosaicSettings
from mosaickv.engines.vllm.engine import settings_from_options
from mosaickv.engines.vllm.telemetry import ADDR_ENV, TelemetryRelay
from mosaickv.policy import (
    PLAN_KEEP_RATIOS,
    QUERY_WINDOW,
    RECALL_TOKEN_RATIOS,
    attention_losses,
    decode_recall,
    kv_energy_losses,
)
from mosaickv.protocol import encode

SETTINGS = {"keep_ratio": 0.25, "token_ratio": 0.25, "block_size": 8, "n_sink": 4, "window": 8,
            "segment_len": 16, "telemetry_every": 2, "recall_every": 3}


class Collected:
    """A telemetry sink that records what the relay hands it (from the relay's thread)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.messages.append(message)

    def wait(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        return list(self.messages)


@pytest.fixture
def relay() -> Any:
    r = TelemetryRelay()
    r.sink = Collected()
    yield r
    r.close()


@pytest.mark.parametrize("cache", ["core", "manager"])
def test_engine_core_prefills_reach_the_worker_as_telemetry(relay: TelemetryRelay, cache: str) -> None:
    settings = {**SETTINGS, "cache": cache}
    env = {**os.environ, ENV_VAR: json.dumps(settings), ADDR_ENV: relay.address,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, str(Path(child.__file__))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps done" in done.stdout
    assert isinstance(relay.sink, Collected)
    relay.sink.wait(4)
    time.sleep(0.5)  # nothing else may follow: prefill 2 and decode steps 2, 3 are not sampled
    got = [m for m in relay.sink.messages if m["type"] == "telemetry"]
    recalls = [m for m in relay.sink.messages if m["type"] == "recall"]
    assert (len(got), len(recalls)) == (2, 2), relay.sink.messages
    # cache: manager also reports the engine core's manager figures (for the vllm engine's stats)
    if cache == "manager":
        stats = relay.cache_stats
        assert stats["cache_requests"] == len(child.PROMPTS) and stats["cache_page_bytes"] > 0
    else:
        assert relay.cache_stats == {}
    _check_recalls(recalls, MosaicSettings(**settings))
    for message, prompt in zip(got, (0, 2), strict=True):  # the 1st and 3rd prefill
        # what the worker sends on: the engine core's worker_id and model are left for it to stamp
        assert "worker_id" not in message and "model" not in message
        encode({**message, "worker_id": "w", "model": "m"})
        assert message["type"] == "telemetry"
        assert (message["head_dim"], message["dtype"]) == (child.D, "float32")
        assert message["keep_ratios"] == list(PLAN_KEEP_RATIOS)
        assert message["tokens"] == child.PROMPTS[prompt] and message["overhead_s"] > 0
        curves = {(c["layer"], c["head"]): c["loss"] for c in message["curves"]}
        energy = {(c["layer"], c["head"]): c["energy"] for c in message["curves"]}
        assert sorted(curves) == [(i, h) for i in range(child.N_LAYERS) for h in range(child.H_KV)]
        for layer in range(child.N_LAYERS):
            # the same curves as policy.attention_losses on that layer's prompt here
            q, k, v = child.inputs(prompt, layer)
            want = attention_losses(k, v, q[-QUERY_WINDOW:], PLAN_KEEP_RATIOS)
            want_energy = kv_energy_losses(k.transpose(0, 1), v.transpose(0, 1), PLAN_KEEP_RATIOS)
            for h in range(child.H_KV):
                torch.testing.assert_close(torch.tensor(energy[(layer, h)], dtype=torch.float64),
                                           want_energy[h], atol=2e-6, rtol=0)
                torch.testing.assert_close(torch.tensor(curves[(layer, h)], dtype=torch.float64), want[h],
                                           atol=2e-6, rtol=0)
                assert curves[(layer, h)][0] > curves[(layer, h)][-1]


def _check_recalls(recalls: list[dict[str, Any]], settings: MosaicSettings) -> None:
    """Decode steps 0 and 3 of prompt 0 were sampled: recompute their recall on caches built from the
    same K/V as the impl builds them (the prompt encoded, then each step's token appended): a core
    cache, or a cache manager's view (its temporary segment packs the tokens that leave the window,
    where the core keeps them dense)."""
    for message, step in zip(recalls, (0, 3), strict=True):
        assert "worker_id" not in message and "model" not in message
        encode({**message, "worker_id": "w", "model": "m"})
        assert message["token_ratios"] == list(RECALL_TOKEN_RATIOS)
        assert message["tokens"] == child.PROMPTS[0] + step + 1 and message["overhead_s"] > 0
        got = {(h["layer"], h["head"]): h["recall"] for h in message["heads"]}
        assert sorted(got) == [(i, h) for i in range(child.N_LAYERS) for h in range(child.H_KV)]
        for layer in range(child.N_LAYERS):
            q = child.decode_inputs(step, layer)[0]
            want = _recall_of(settings, layer, step, q[0])
            for h in range(child.H_KV):
                torch.testing.assert_close(torch.tensor(got[(layer, h)], dtype=torch.float64), want[h],
                                           atol=2e-6, rtol=0)
                assert got[(layer, h)][0] < 1.0  # 96+ random tokens: 5% of the blocks miss mass


def _recall_of(settings: MosaicSettings, layer: int, step: int, q: torch.Tensor) -> torch.Tensor:
    method = settings.make_method()
    _, k, v = child.inputs(0, layer)
    steps = [child.decode_inputs(s, layer)[1:] for s in range(step + 1)]
    if settings.cache == "core":
        cache = method.encode(k, v)
        for k1, v1 in steps:
            cache.append(k1, v1)
        return decode_recall(cache, q, child.D**-0.5)
    # as the vLLM adapter makes it: one manager over every layer (their evictions are staggered)
    config = CacheConfig(n_threads=1, evict_tokens=settings.evict_tokens)
    mgr = CacheManager(method, child.N_LAYERS, child.H_KV, child.D, k.dtype, "cpu", config)
    try:
        mgr.add_request("r")
        mgr.prefill("r", layer, k, v)
        for k1, v1 in steps:
            mgr.append("r", layer, k1, v1)
        with mgr.view("r", layer) as cache:
            return decode_recall(cache, q, child.D**-0.5)
    finally:
        mgr.close()


def test_relay_drops_malformed_frames_and_keeps_relaying(relay: TelemetryRelay) -> None:
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(relay.address)
    try:
        push.send_multipart([b"\xc1 not msgpack"])
        push.send_multipart(encode({"type": "recall", "worker_id": "x", "model": "y", "token_ratios": [0.1],
                                    "heads": [{"layer": 0, "head": 0, "recall": [0.5]}], "tokens": 9,
                                    "overhead_s": 0.01}))
        assert isinstance(relay.sink, Collected)
        got = relay.sink.wait(1)
        assert [m["type"] for m in got] == ["recall"] and got[0]["heads"][0]["recall"] == [0.5]
    finally:
        push.close()


def test_telemetry_every_is_a_backend_option() -> None:
    settings = settings_from_options({"telemetry_every": "8", "recall_every": "4", "cache": "core"})
    assert settings == MosaicSettings(telemetry_every=8, recall_every=4, cache="core")
    assert not {"telemetry_every", "recall_every"} & set(vars(settings.make_method()))
    with pytest.raises(ValueError, match="telemetry_every must be an integer >= 0"):
        MosaicSettings(telemetry_every=-1)
