"""The `vllm` worker engine, up to where a machine without a GPU stops it.

End to end, vLLM 0.33.0's PyPI wheel cannot run a model here: with VLLM_TARGET_DEVICE=cpu the engine
core starts and schedules, but the CPU worker dies in vllm/v1/worker/cpu_worker.py calling
torch.ops._C.init_cpu_memory_env (the CPU C++ extension is not in the CUDA wheel); without it no
platform is found. docs/vllm.md gives the GPU commands.
"""

import pytest

from mosaickv.engines.vllm.config import MosaicSettings
from mosaickv.engines.vllm.engine import VLLMEngine, settings_from_options


def test_backend_options_are_typed() -> None:
    settings = settings_from_options({"keep_ratio": "0.5", "group": "2", "summary": "mean"})
    assert settings == MosaicSettings(keep_ratio=0.5, group=2, summary="mean")
    assert settings.cache == "manager"  # the default: packed pages in vLLM's KV cache
    assert settings_from_options({"cache": "core", "arena_reserve": "0.2"}) == MosaicSettings(
        cache="core", arena_reserve=0.2)


@pytest.mark.parametrize(("options", "match"), [
    ({"ratio": "0.5"}, "unknown mosaickv option"),
    ({"group": "two"}, "bad mosaickv option value"),
    ({"group": "3"}, "group size g must be 1, 2 or 4"),
    ({"cache": "disk"}, "cache must be one of"),
])
def test_bad_backend_options(options: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        settings_from_options(options)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"device": "cpu"}, "CUDA devices"),
    ({"backend": "fast"}, "backend must be one of"),
    ({"max_inflight": 0}, "max_inflight"),
])
def test_engine_refuses_before_loading(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VLLMEngine("no-such-model", **kwargs)  # type: ignore[arg-type]
