"""MosaicKV attention backend for vLLM 0.33.0, in the shape of ``vllm/v1/attention/backends/
triton_attn.py``: KV spec, metadata dataclass, metadata builder (once per step), impl (per layer).

MosaicKV (arXiv 2607.00760) keeps each sequence's KV as dense sinks + rotated, per-vector top-r
packed segments + a dense recent window, and attends to the top blocks per decode step.

What runs where (checked against the installed vLLM 0.33.0):
- pages: ``MosaicKVAttentionBackend.customize_spec`` (vLLM's own hook, applied by both model
  runners) turns a layer's ``FullAttentionSpec`` into ``MosaicKVAttentionSpec``, whose page holds
  the packed bytes of ``block_size`` tokens (``MosaicSettings.state_bytes``), so vLLM sizes the
  number of blocks from compressed pages. The spec is not prefix-cacheable: re-encoding changes a
  block's content after it was written, which prefix caching forbids.
- ``do_kv_cache_update`` encodes: a new request's prompt becomes a ``mosaickv.core`` cache
  (segments, rotations, summaries), a decode token is appended to its request's cache.
- ``forward``: prefill rows run full causal attention on the step's dense K/V (the prompt is still
  dense in this step); decode rows run PackedAttention on the compressed caches through
  ``mosaickv.ops.DecodePlan`` (CUDA kernels on a GPU, the core reference on CPU).
With ``cache: core`` (the reference, ``mosaickv.core``) the packed tensors live in per-request core
caches held by the impl, keyed by the request's first physical block, beside vLLM's pages.

``cache: manager`` (MosaicSettings) stores and attends through one ``mosaickv.cache.CacheManager``
per worker process instead (``engines/vllm/cache.py``): its layers are the MosaicKV layers of
vLLM's static forward context in construction order (vLLM gives the impl no layer name at
construction; ``layer.layer_name`` reaches ``do_kv_cache_update`` and ``forward``), and a request's
pages go back to the pool when the model runner drops it (the plugin wraps
``GPUModelRunner._on_request_state_removed``) or when a new prompt takes its first block. The
manager's page pool is cut out of the KV cache vLLM allocated for these layers (``cache.page_storage``)
and the spec's page size is what the manager measurably stores per token, so the packed bytes live
in vLLM's memory once.
"""

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec

from mosaickv.core import KVCache
from mosaickv.core.methods.mosaic import MosaicMethod
from mosaickv.engines.vllm import cache as manager_cache
from mosaickv.engines.vllm import policies, telemetry
from mosaickv.engines.vllm.cache import put_rows, select_rows
from mosaickv.engines.vllm.config import MosaicSettings
from mosaickv.ops import DecodePlan, cuda_available

# A child of vLLM's "vllm" logger: vLLM configures handlers for that tree only (propagate off), so
# this is the name under which our lines appear in a `vllm serve` log.
logger = logging.getLogger("vllm.plugins.mosaickv")

HEAD_SIZES = [64, 80, 96, 112, 128, 256]


@dataclass(frozen=True, kw_only=True)
class MosaicKVAttentionSpec(FullAttentionSpec):
    """A full-attention layer whose pages hold MosaicKV-packed tokens.

    ``state_content_bytes`` (bytes per token and KV head, see ``MosaicSettings.state_bytes``) makes
    vLLM's ``page_size_bytes`` = num_kv_heads x block_size x packed bytes. The settings ride along so
    every process (engine core, workers) sizes and reads pages the same way.
    """

    settings: MosaicSettings = MosaicSettings()

    @property
    def prefix_cacheable(self) -> bool:
        # A compressed block is re-encoded when its segment closes: prefix caching would hand a
        # later request bytes that no longer match their hash.
        return False

    @classmethod
    def merge(  # type: ignore[override]
        cls, specs: list["MosaicKVAttentionSpec"]
    ) -> "MosaicKVAttentionSpec":
        settings = {spec.settings for spec in specs}
        if len(settings) != 1:
            raise ValueError(
                f"all MosaicKV layers of a KV cache group must share one setting, got {settings}")
        return replace(super().merge(specs), settings=specs[0].settings)


@dataclass
class MosaicKVMetadata(AttentionMetadata):
    """Per-step plan shared by every layer (built once per step by the builder).

    Attributes:
        num_actual_tokens: tokens in the step, excluding padding.
        query_start_loc: [num_reqs + 1] int32 CPU, request i's tokens are [qsl[i], qsl[i+1]).
        context_lens: [num_reqs] int32 CPU, tokens of request i already cached before this step.
        request_keys: [num_reqs] int64 CPU, the physical id of each request's first KV block: unique
            among live requests (prefix caching is off, so blocks are never shared).
        slot_mapping: [num_actual_tokens] int64, vLLM's slot of each token.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    request_keys: torch.Tensor
    slot_mapping: torch.Tensor

    @property
    def num_reqs(self) -> int:
        return int(self.context_lens.shape[0])


class MosaicKVMetadataBuilder(AttentionMetadataBuilder[MosaicKVMetadata]):
    # The CPU path loops over requests in Python and keeps per-request caches: nothing a CUDA
    # graph could capture.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = None

    def __init__(self, kv_cache_spec: KVCacheSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MosaicKVMetadata:
        cm = common_attn_metadata
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].to(torch.int32)
        seq_lens = cm.seq_lens[: cm.num_reqs].to("cpu", torch.int32)
        query_lens = qsl[1:] - qsl[:-1]
        return MosaicKVMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=qsl,
            context_lens=seq_lens - query_lens,
            request_keys=cm.block_table_tensor[: cm.num_reqs, 0].to("cpu", torch.int64),
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
        )


class MosaicKVAttentionImpl(AttentionImpl[MosaicKVMetadata]):
    """One layer's MosaicKV attention (decoder self-attention, GQA, no ALiBi/soft-cap/window)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **unsupported: Any) -> None:
        refused = {
            "ALiBi slopes": alibi_slopes is not None,
            "a sliding window": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            f"attention type {attn_type!r} (only decoder self-attention)": attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype {kv_cache_dtype!r} (use auto, float16 or bfloat16)":
                kv_cache_dtype not in MosaicKVAttentionBackend.supported_kv_cache_dtypes,
        }
        refused.update({f"argument {name}={value!r}": value is not None and value is not False
                        for name, value in unsupported.items()})
        reasons = [what for what, bad in refused.items() if bad]
        if reasons:
            raise ValueError(f"MosaicKV backend cannot run a layer with {', '.join(reasons)}; "
                             "use vLLM's stock backend for this model")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.settings = MosaicSettings.from_env()
        self.method = self.settings.make_method()
        self.caches: dict[int, KVCache] = {}  # cache: core, by request key
        self.use_manager = self.settings.cache == "manager"
        self._place: tuple[int, int] | None = None  # (index, count) among MosaicKV layers, once known
        self._place_known = False

    @property
    def kv_bytes(self) -> int:
        """Bytes this layer's compressed caches really hold (values, bitmaps, rotations, summaries,
        dense sinks and windows), over every request it still holds. With ``cache: manager`` the
        layers share one manager: its pages and dense tensors over every layer."""
        if self.use_manager:
            adapter = manager_cache.current()
            if adapter is None:
                return 0
            stats = adapter.stats()
            return int(stats["cache_page_bytes"] + stats["cache_dense_bytes"])
        return sum(cache.nbytes for cache in self.caches.values())

    def _adapter(self, key: torch.Tensor) -> manager_cache.VllmCacheAdapter:
        """The worker's shared adapter, made on the first step from the MosaicKV (cache: manager)
        layers vLLM has registered, in construction order, their bound KV caches (the manager's
        pages), and this step's K dtype and device."""
        made = manager_cache.current()
        if made is not None:  # every later call of every layer: nothing to look up
            return made
        layers = get_forward_context().no_compile_layers
        ours = {name: module for name, module in layers.items()
                if getattr(getattr(module, "impl", None), "use_manager", False)}
        kv_caches = [module.kv_cache for module in ours.values()]
        if any(t.numel() == 0 for t in kv_caches):
            _log_once("MosaicKV cache manager: vLLM bound no KV cache to its layers; the manager "
                      "allocates its own pages (expected only in tests)")
            kv_caches = []
        return manager_cache.shared(self.settings, list(ours), self.num_kv_heads, self.head_size,
                                    key.dtype, key.device, kv_caches)

    def _rows(self, md: MosaicKVMetadata) -> list[tuple[int, int, int, int]]:
        """(request key, first token, end token, context length) per request with tokens."""
        qsl, ctx, keys = md.query_start_loc.tolist(), md.context_lens.tolist(), md.request_keys.tolist()
        return [(keys[i], qsl[i], qsl[i + 1], ctx[i]) for i in range(md.num_reqs) if qsl[i + 1] > qsl[i]]

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Encode the step's K/V into each request's compressed cache.

        Args:
            key, value: [num_tokens, num_kv_heads, head_size] post-RoPE, model dtype.
            kv_cache: the layer's page view [num_blocks, num_kv_heads, block_size, state elems]
                (not written on the CPU path, see the module docstring).
            slot_mapping: [num_tokens] int64 (unused: requests are found through the metadata).
        """
        md = _step_metadata(layer)
        if md is None:  # profiling / dummy run
            return
        rows = self._rows(md)
        for _, lo, hi, ctx in rows:
            if ctx and hi - lo != 1:
                raise NotImplementedError(
                    f"MosaicKV got {hi - lo} new tokens for a request with {ctx} cached ones (chunked "
                    "prefill or speculative decoding); run vLLM with --no-enable-chunked-prefill, "
                    "--max-num-batched-tokens >= --max-model-len and without speculative decoding")
        if self.use_manager:
            adapter = self._adapter(key)
            methods = self._policy_methods(len(adapter.layers)) if any(ctx == 0 for *_, ctx in rows) else None
            adapter.store(md, adapter.layer(layer.layer_name), rows, key, value, methods)  # type: ignore[attr-defined]
            return
        for req, lo, hi, ctx in rows:
            k, v = key[lo:hi], value[lo:hi]
            if ctx == 0:
                self.caches[req] = self._prompt_method(layer).encode(k, v)
                continue
            if req not in self.caches:
                raise RuntimeError(f"MosaicKV has no cache for the request in block {req} ({ctx} tokens "
                                   "cached by vLLM): its prompt was never encoded by this layer")
            self.caches[req].append(k, v)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: MosaicKVMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for the step's tokens.

        Args:
            query: [num_tokens, num_heads, head_size]; key, value: [num_tokens, num_kv_heads, head_size].
            output: [num_tokens, num_heads, head_size] (or flattened heads), written in place.
        Returns:
            output.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("MosaicKV does not fuse output quantization")
        if attn_metadata is None:  # profiling run: vLLM only measures memory
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        decode_rows, decode_keys = [], []
        for req, lo, hi, ctx in self._rows(attn_metadata):
            if ctx == 0:
                out[lo:hi] = _causal_attention(q[lo:hi], key[lo:hi], value[lo:hi], self.scale)
                if self.settings.telemetry_every:
                    self._sample_prefill(layer, req, q[lo:hi], key[lo:hi], value[lo:hi])
            else:
                decode_rows.append(lo)
                decode_keys.append(req)
        if decode_rows and self.use_manager:
            adapter = self._adapter(key)
            index = adapter.layer(layer.layer_name)  # type: ignore[attr-defined]
            if self.settings.recall_every:
                with adapter.view(index, decode_keys[0]) as cache:
                    self._sample_decode(layer, cache, q[decode_rows[0]])
            got = adapter.attend(index, decode_keys, select_rows(q, decode_rows), self.scale)
            put_rows(out, decode_rows, got.to(out.device, out.dtype))
            telemetry.report_cache_stats(adapter.stats)
        elif decode_rows:
            decode_caches = [self.caches[req] for req in decode_keys]
            if self.settings.recall_every:
                self._sample_decode(layer, decode_caches[0], q[decode_rows[0]])
            # One plan for every decode row of this layer: the CUDA kernels when they are built and
            # the caches are on a GPU; otherwise the core reference (a "cpu" plan runs the core on
            # the caches' own device).
            kernels = q.is_cuda and cuda_available()
            plan = DecodePlan(decode_caches, q.device if kernels else torch.device("cpu"))
            put_rows(out, decode_rows, plan.run(select_rows(q, decode_rows), scale=self.scale).to(out.dtype))
        return output

    def _layer_place(self, layer: AttentionLayer) -> tuple[int, int] | None:
        """``_mosaic_layer_place`` of this impl's layer, looked up once (the forward context's
        layers never change after the model is built; an impl serves one layer)."""
        if not self._place_known:
            self._place, self._place_known = _mosaic_layer_place(layer), True
        return self._place

    def _policy_methods(self, n_layers: int) -> list[MosaicMethod] | None:
        """One method per MosaicKV layer from the newest policy the worker published
        (engines/vllm/policies.py), or None (no policy: the settings' method everywhere)."""
        return policies.current_methods(self.settings, n_layers, self.num_kv_heads)

    def _prompt_method(self, layer: AttentionLayer) -> MosaicMethod:
        """cache: core: the method this layer encodes a new prompt with (the policy's, or the
        settings')."""
        place = self._layer_place(layer)
        methods = self._policy_methods(place[1]) if place is not None else None
        return methods[place[0]] if methods is not None and place is not None else self.method

    def _sample_prefill(self, layer: AttentionLayer, req: int, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> None:
        """telemetry_every: hand this prompt's Q/K/V to the process's sampler (engines/vllm/telemetry.py).
        Best effort: never raises."""
        sampler = telemetry.prefill_sampler(self.settings.telemetry_every)
        place = self._layer_place(layer)
        if sampler is not None and place is not None:
            sampler.on_prefill(*place, req, q, k, v)

    def _sample_decode(self, layer: AttentionLayer, cache: KVCache, q: torch.Tensor) -> None:
        """recall_every: hand the step's first decode row (q: [H_q, D]; its cache
        already holds the step's token) to the process's recall sampler. Best effort: never raises."""
        sampler = telemetry.recall_sampler(self.settings.recall_every)
        place = self._layer_place(layer)
        if sampler is not None and place is not None:
            sampler.on_decode(*place, cache, q, self.scale)


def _mosaic_layer_place(layer: AttentionLayer) -> tuple[int, int] | None:
    """(index, count) of ``layer`` among the MosaicKV layers of vLLM's static forward context, in
    construction order (vLLM gives the impl no layer index); None when it is not one of them."""
    names = [name for name, module in get_forward_context().no_compile_layers.items()
             if isinstance(getattr(module, "impl", None), MosaicKVAttentionImpl)]
    name = getattr(layer, "layer_name", None)
    return (names.index(name), len(names)) if name in names else None


def _step_metadata(layer: AttentionLayer) -> MosaicKVMetadata | None:
    """This step's metadata for ``layer`` from vLLM's forward context (do_kv_cache_update is not
    given it)."""
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # speculative decoding: [0] is the target model's dict
        md = md[0]
    if isinstance(md, dict):
        md = md.get(layer.layer_name)  # type: ignore[attr-defined]
    return md


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Full causal attention of a fresh prompt, float32 accumulation.

    Args:
        q: [T, H_q, D]; k, v: [T, H_kv, D] (query head i uses KV head i // (H_q / H_kv)).
    Returns:
        [T, H_q, D] in q's dtype.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(0, 1).to(q.dtype)


class MosaicKVAttentionBackend(AttentionBackend):
    """Registered as ``AttentionBackendEnum.CUSTOM`` by ``mosaickv.engines.vllm.plugin.register``."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[MosaicKVAttentionImpl]:
        return MosaicKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MosaicKVMetadataBuilder]:
        return MosaicKVMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return HEAD_SIZES

    @staticmethod
    def get_supported_kernel_block_sizes(
        kv_cache_spec: KVCacheSpec | None = None,
    ) -> list[int | MultipleOf]:
        # A page must hold whole selection blocks so a block summary never straddles two pages.
        return [MultipleOf(MosaicSettings.from_env().block_size)]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Full-attention spec -> MosaicKVAttentionSpec with the packed page size (idempotent)."""
        if isinstance(spec, MosaicKVAttentionSpec) or type(spec) is not FullAttentionSpec:
            return spec  # already ours, or a layer kind validate_configuration refuses
        if spec.head_size_v != spec.head_size:
            raise ValueError(
                f"MosaicKV needs equal K and V head sizes, got {spec.head_size} and {spec.head_size_v}")
        settings = MosaicSettings.from_env()
        given = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
        given["state_content_bytes"] = settings.state_bytes(spec.head_size, spec.dtype)
        new = MosaicKVAttentionSpec(**given, settings=settings)
        _log_once(f"MosaicKV pages: {new.state_content_bytes} B per token and KV head vs "
                  f"{spec.state_content_size_bytes} B dense; prefix caching is off for these layers "
                  "(compressed blocks are re-encoded after they are written)")
        return new

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # On the CPU path the packed data is held outside vLLM's pages: a connector would move empty pages.
        return False


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
