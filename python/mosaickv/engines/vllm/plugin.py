"""vLLM ``general_plugins`` entry point: registers MosaicKV as ``AttentionBackendEnum.CUSTOM``.

vLLM runs it in every process (API server, engine core, workers), possibly more than once, and
swallows its exceptions (``vllm/plugins/__init__.py``): it is idempotent and logs one line when it
has done its work, so a missing line means the plugin did not load.

With ``cache: manager`` (MOSAICKV_VLLM_CONFIG's default) it also wraps the model runner's request-removal
hook so a finished request's pages go back to the shared cache manager (``patch_request_end``); the
runner module is imported only then (it costs seconds in every process).
"""

import logging

# A child of vLLM's "vllm" logger: vLLM configures handlers for that tree only (propagate off), so
# this is the name under which our lines appear in a `vllm serve` log.
logger = logging.getLogger("vllm.plugins.mosaickv")

BACKEND_PATH = "mosaickv.engines.vllm.backend.MosaicKVAttentionBackend"
_done = False


def register() -> None:
    """Register the backend, the KV spec and the layer's spec hook (once per process)."""
    global _done
    if _done:
        return
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from mosaickv.engines.vllm.backend import MosaicKVAttentionBackend, MosaicKVAttentionSpec

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # The registry fills itself with vLLM's built-in specs only while it is empty: fill it first,
    # or registering ours would leave FullAttentionSpec & co. unregistered.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        MosaicKVAttentionSpec, FullAttentionManager, uniform_type_base_spec=FullAttentionSpec
    )
    _patch_layer_spec(Attention, MosaicKVAttentionBackend)
    if _wants_manager():
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        patch_request_end(GPUModelRunner)
    _done = True
    logger.info("MosaicKV registered: attention backend CUSTOM -> %s, KV spec %s, "
                "Attention.get_kv_cache_spec returns it for CUSTOM layers",
                BACKEND_PATH, MosaicKVAttentionSpec.__name__)


def _patch_layer_spec(attention_cls: type, backend_cls: type) -> None:
    """Make a CUSTOM layer report its compressed spec itself.

    Both model runners already pass the layer's spec through ``backend.customize_spec``, but some
    callers (the speculative-decoding proposers) read ``Attention.get_kv_cache_spec`` directly; with
    this wrapper every caller sees the packed page size. patches/vllm-0.33.0 makes the same change
    in vLLM's source.
    """
    original = attention_cls.get_kv_cache_spec
    if getattr(original, "_mosaickv", False):
        return

    def get_kv_cache_spec(self, vllm_config):  # type: ignore[no-untyped-def]
        spec = original(self, vllm_config)
        if spec is not None and self.attn_backend is backend_cls:
            spec = backend_cls.customize_spec(spec)
        return spec

    get_kv_cache_spec._mosaickv = True  # type: ignore[attr-defined]
    attention_cls.get_kv_cache_spec = get_kv_cache_spec


def _wants_manager() -> bool:
    from mosaickv.engines.vllm.config import MosaicSettings

    try:
        return MosaicSettings.from_env().cache == "manager"
    except ValueError:
        return False  # the backend reports bad settings itself; registering must not fail on them


def _first_block(req_state: object) -> int | None:
    """The first physical block of a runner request (KV cache group 0, the MosaicKV layers')."""
    groups = getattr(req_state, "block_ids", None)
    if not groups or not groups[0]:
        return None
    return int(groups[0][0])


def patch_request_end(runner_cls: type) -> None:
    """Wrap ``runner_cls._on_request_state_removed(req_id, req_state)`` (vLLM 0.33.0 calls it for
    every finished request in ``_update_states``, before the step runs) to free the request's
    manager pages (idempotent: wraps once).

    A request preempted and then finished keeps its old block ids, whose first block may already
    start another live request: the release is skipped when a request the runner still holds
    starts in that block (the stale pages are then freed when the block's new prompt is stored).
    """
    original = runner_cls._on_request_state_removed
    if getattr(original, "_mosaickv", False):
        return

    def _on_request_state_removed(self, req_id, req_state):  # type: ignore[no-untyped-def]
        original(self, req_id, req_state)
        from mosaickv.engines.vllm.cache import release_block

        key = _first_block(req_state)
        if key is None:
            return
        if any(_first_block(state) == key for state in getattr(self, "requests", {}).values()):
            return
        release_block(key)

    _on_request_state_removed._mosaickv = True  # type: ignore[attr-defined]
    runner_cls._on_request_state_removed = _on_request_state_removed
