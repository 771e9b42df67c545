"""The plugin through vLLM's own loader, the registry, the KV spec and validate_configuration."""

import pytest
import torch
from vllm.platforms.interface import DeviceCapability
from vllm.plugins import load_general_plugins
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from mosaickv.engines.vllm import plugin
from mosaickv.engines.vllm.backend import MosaicKVAttentionBackend, MosaicKVAttentionSpec

H100 = DeviceCapability(9, 0)


@pytest.fixture(scope="module", autouse=True)
def loaded() -> None:
    load_general_plugins()


def llama_8b_spec() -> FullAttentionSpec:
    """One Llama-3.1-8B attention layer as vLLM builds it: 8 KV heads of 128, bf16, 16-token blocks."""
    return FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)


def test_vllm_loader_registers_custom() -> None:
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is MosaicKVAttentionBackend
    assert backend.get_name() == "CUSTOM"
    assert AttentionBackendEnum["CUSTOM"].is_overridden()


def test_entry_point_is_idempotent_in_process() -> None:
    plugin.register()  # already run by vLLM's loader in this process
    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_class() is MosaicKVAttentionBackend


def test_entry_point_logs_one_line_in_a_fresh_process() -> None:
    import subprocess
    import sys

    # vLLM's logging as its engines configure it, its loader twice, then our entry point again:
    # one line, through vLLM's own log handler.
    code = ("from vllm.config.logging import LoggingConfig\n"
            "from vllm.logger import configure_logging; configure_logging(LoggingConfig())\n"
            "from vllm.plugins import load_general_plugins; load_general_plugins(); load_general_plugins()\n"
            "from mosaickv.engines.vllm import plugin; plugin.register()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout + run.stderr
    lines = [line for line in output.splitlines() if "MosaicKV registered: attention backend CUSTOM" in line]
    assert len(lines) == 1, output[-2000:]
    assert "INFO" in lines[0] and "[plugin.py" in lines[0]


def test_llama_8b_page_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # the defaults (r = 0.25, g = 1, B = 8, minmax, 1024) on the core path, whose cell is a formula
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", '{"cache": "core"}')
    spec = MosaicKVAttentionBackend.customize_spec(llama_8b_spec())
    assert isinstance(spec, MosaicKVAttentionSpec)
    # Per token and KV head (D = 128, bf16): K and V each 32 kept values (64 B) + 4 bitmap words
    # (16 B) = 160 B; minmax summary 2 x 128 x 2 B per 8 tokens = 64 B; two 128 x 128 float32
    # rotations per 1024-token segment = 128 B. 352 B vs 512 B dense.
    assert spec.state_content_bytes == 352
    assert spec.page_size_bytes == 8 * 16 * 352
    assert llama_8b_spec().page_size_bytes == 8 * 16 * 512
    assert spec.prefix_cacheable is False
    # The default, cache: manager, sizes the cell from what the manager stores in pages: never less
    # than the packed data above, and still less than dense.
    monkeypatch.delenv("MOSAICKV_VLLM_CONFIG")
    managed = MosaicKVAttentionBackend.customize_spec(llama_8b_spec())
    assert managed.settings.cache == "manager" and 352 < managed.state_content_bytes < 512


def test_page_bytes_match_a_real_core_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page formula against the bytes the core really stores for one closed segment."""
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", '{"cache": "core"}')
    spec = MosaicKVAttentionBackend.customize_spec(llama_8b_spec())
    method = spec.settings.make_method()
    method.n_sink, method.window = 0, 0
    t = method.segment_len
    # Bytes per token and KV head do not depend on the head count: 2 heads keep the test fast.
    k = torch.randn(t, 2, 128, dtype=torch.bfloat16)
    cache = method.encode(k, torch.randn_like(k))
    assert len(cache.segments) == 1 and cache.length == t
    assert cache.nbytes == t * 2 * spec.settings.token_head_bytes(128, torch.bfloat16)
    assert spec.state_content_bytes * spec.block_size == spec.page_size_bytes // 8


def test_spec_registered_with_full_attention_manager() -> None:
    spec = MosaicKVAttentionBackend.customize_spec(llama_8b_spec())
    assert KVCacheSpecRegistry.get_manager_class(spec) is FullAttentionManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is FullAttentionSpec
    merged = MosaicKVAttentionSpec.merge([spec, spec])
    assert merged.settings == spec.settings and merged.page_size_bytes == spec.page_size_bytes
    # Built-in specs are still registered (the plugin filled the registry before adding ours).
    assert KVCacheSpecRegistry.get_manager_class(llama_8b_spec()) is FullAttentionManager


def test_customize_spec_is_idempotent_and_leaves_other_kinds() -> None:
    spec = MosaicKVAttentionBackend.customize_spec(llama_8b_spec())
    assert MosaicKVAttentionBackend.customize_spec(spec) is spec
    window = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                               sliding_window=4096)
    assert MosaicKVAttentionBackend.customize_spec(window) is window


def test_real_attention_layer_reports_the_packed_spec() -> None:
    """vLLM's own Attention layer on our backend builds our impl and, through the plugin's
    get_kv_cache_spec wrapper, reports the packed page itself (no runner involved)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from mosaickv.engines.vllm.backend import MosaicKVAttentionImpl

    config = VllmConfig()
    with set_current_vllm_config(config):
        layer = Attention(32, 128, 128**-0.5, num_kv_heads=8, prefix="model.layers.0.self_attn.attn",
                          attn_backend=MosaicKVAttentionBackend)
    assert isinstance(layer.impl, MosaicKVAttentionImpl)
    spec = layer.get_kv_cache_spec(config)
    assert isinstance(spec, MosaicKVAttentionSpec)
    assert spec.num_kv_heads == 8 and spec.head_size == 128
    assert spec.state_content_bytes == MosaicKVAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=spec.block_size, num_kv_heads=8, head_size=128, dtype=spec.dtype)
    ).state_content_bytes


def validate(**overrides: object) -> list[str]:
    args: dict[str, object] = dict(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
        has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=H100, attn_type="decoder")
    args.update(overrides)
    return MosaicKVAttentionBackend.validate_configuration(**args)  # type: ignore[arg-type]


def test_validate_accepts_llama_8b() -> None:
    assert validate() == []


@pytest.mark.parametrize(("overrides", "reason"), {
    "mla": ({"use_mla": True}, "MLA not supported"),
    "head_size": ({"head_size": 72}, "head_size not supported"),
    "fp8_cache": ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype not supported"),
    "block_not_multiple_of_8": ({"block_size": 12}, "block_size not supported"),
    "sliding_window": ({"has_sliding_window": True}, "sliding window not supported"),
    "attention_sinks": ({"has_sink": True}, "attention sinks not supported"),
    "encoder": ({"attn_type": "encoder_only"}, "attention type encoder_only not supported"),
    "kv_connector": ({"use_kv_connector": True}, "KV connector not supported"),
}.values(), ids=["mla", "head_size", "fp8_cache", "block_not_multiple_of_8", "sliding_window",
                 "attention_sinks", "encoder", "kv_connector"])
def test_validate_refuses(overrides: dict[str, object], reason: str) -> None:
    assert reason in validate(**overrides)


def test_validate_refuses_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSAICKV_VLLM_CONFIG", '{"keep_ratio": null}')
    with pytest.raises(ValueError, match="keep_ratio must be a number"):
        validate()
