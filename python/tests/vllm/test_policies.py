"""Segment policies from the worker to the engine core (engines/vllm/policies.py), with real
sockets: the worker's PolicyPublisher (PUB on ipc://) and the engine-core side's subscriber, in one
process here; real vLLM Attention layers on the MosaicKV backend store prompts through the shared
cache manager before and after a policy arrives."""

import time

import pytest
import torch
from test_backend import BLOCK, H_KV, H_Q, D, Request, common, make_layer
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.kv_cache_interface import FullAttentionSpec

from mosaickv.engines.vllm import cache as manager_cache
from mosaickv.engines.vllm import policies
from mosaickv.engines.vllm.backend import MosaicKVAttentionBackend, MosaicKVMetadataBuilder
from mosaickv.engines.vllm.config import MosaicSettings
from mosaickv.engines.vllm.policies import ADDR_ENV, PolicyPublisher, check_fits

# One 188-token prompt segment: long enough that half the kept elements need fewer whole pages.
SETTINGS = ('{"keep_ratio": 0.25, "token_ratio": 0.25, "block_size": 8, "n_sink": 4, "window": 8, '
            '"segment_len": 256, "cache": "manager"}')


def policy(keep: float, n_layers: int = 2) -> list[dict]:
    return [{"layer": layer, "head": h, "keep_ratio": keep, "token_ratio": 0.25, "loss_threshold": 0.1}
            for layer in range(n_layers) for h in range(H_KV)]


def prefill(layers: list, builder: MosaicKVMetadataBuilder, config: VllmConfig, block: int,
            k: torch.Tensor, v: torch.Tensor) -> None:
    """One step storing a prompt (the same K/V in every layer) in its own blocks from ``block``."""
    request = Request(block, k, v)
    cm = common([(request, 0, k.shape[0])])
    md = builder.build(0, cm)
    with set_forward_context({layer.layer_name: md for layer in layers}, config):
        for layer in layers:
            q = torch.randn(k.shape[0], H_Q, D)
            out = torch.empty(k.shape[0], H_Q * D)
            layer.impl.do_kv_cache_update(layer, k, v, torch.empty(0), cm.slot_mapping)
            layer.impl.forward(layer, q, k, v, torch.empty(0), md, out)


def test_a_published_policy_changes_the_next_prompts_real_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", SETTINGS)
    monkeypatch.setattr(policies, "_subscriber", None)
    publisher = PolicyPublisher()
    monkeypatch.setenv(ADDR_ENV, publisher.address)
    manager_cache.close_shared()
    config = VllmConfig()  # a fresh forward context: only these layers are the worker's
    layers = [make_layer(config) for _ in range(2)]
    spec = MosaicKVAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_KV, head_size=D, dtype=torch.float32))
    names = [layer.layer_name for layer in layers]
    builder = MosaicKVMetadataBuilder(spec, names, config, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(200, H_KV, D, generator=g), torch.randn(200, H_KV, D, generator=g)
    try:
        prefill(layers, builder, config, 3, k, v)
        adapter = manager_cache.current()
        assert adapter is not None
        before = adapter.kv_bytes(3)
        settings = MosaicSettings.from_env()
        assert policies.current_methods(settings, 2, H_KV) is None  # nothing published yet

        heads = policy(0.125)
        check_fits(settings, heads, 2, H_KV)
        assert publisher.publish(heads) == 1
        deadline = time.monotonic() + 10
        while policies.current_methods(settings, 2, H_KV) is None:  # SUB connects, a re-publish arrives
            assert time.monotonic() < deadline, "policy 1 never reached the engine-core side"
            time.sleep(0.05)
        prefill(layers, builder, config, 40, k, v)
        after = adapter.kv_bytes(40)
        # the same prompt at half the kept elements holds fewer real bytes; the earlier one is unchanged
        assert after < before and adapter.kv_bytes(3) == before
        methods = adapter.manager._requests[adapter._requests[40]]
        assert all(stream.method.head_keep_ratios == (0.125,) * H_KV for stream in methods)
    finally:
        manager_cache.close_shared()
        publisher.close()


def test_a_policy_that_does_not_fit_is_refused_with_the_reason() -> None:
    settings = MosaicSettings(keep_ratio=0.25)
    assert set(check_fits(settings, policy(0.25), 2, H_KV)) == {0, 1}
    with pytest.raises(ValueError, match="vLLM's pages were sized for"):
        check_fits(settings, policy(0.5), 2, H_KV)
    with pytest.raises(ValueError, match="covers"):
        check_fits(settings, policy(0.125)[:-1], 2, H_KV)
    mixed = policy(0.125)
    mixed[0]["token_ratio"] = 0.5
    with pytest.raises(ValueError, match="different token ratios"):
        check_fits(settings, mixed, 2, H_KV)
