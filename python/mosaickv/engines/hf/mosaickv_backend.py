"""The hf engine's ``mosaickv`` backend: full-attention prefill, then the prompt's KV encoded per layer
by a core method (mosaickv.core: full quest think naive2d mosaic); decode attends on the packed form.

Two ways to hold the packed form (option ``cache``):
- ``manager`` (the default for method mosaic): the backend's one ``mosaickv.cache.CacheManager`` (per
  backend instance, so per worker model) holds every request's cache in pages, with the temporary
  segment, host copies and CPU re-encoders (docs/CACHE.md); the vLLM backend adapts to the same
  manager. A request's pages go back to the pool in ``release_cache``.
- ``core`` (the only one for the other methods): one ``mosaickv.core.KVCache`` per layer, encoded and
  appended synchronously on the decode thread.

How it plugs into transformers 5.x:
- ``PackedCache`` (a ``Cache``) holds one ``PackedLayer`` per decoder layer. During prefill a layer keeps
  the dense K/V it is given; ``end_prefill`` encodes each layer with the method (into a core KVCache,
  or into the manager) and drops the dense copy. After that, ``update`` appends the new token.
- The attention function ``mosaickv`` (registered with transformers' ``AttentionInterface`` by
  ``prepare``) runs stock SDPA during prefill and records the last queries of the prompt (ThinK's
  query window); at decode it attends on the packed cache (``KVCache.attend`` or
  ``CacheManager.attend``). It finds that cache
  through the layer whose ``update`` ran just before it on this thread: transformers calls
  ``cache.update`` then the attention function inside the same attention forward.

Options (``--backend-option KEY=VALUE``): ``method`` (default mosaic) and the method's parameters
(``keep_ratio``, ``token_ratio``, ``block_size``, ``window``, ``n_sink``, ``segment_len``, ``summary``,
``group``, ...; numbers parsed, ``none`` for None), plus ``budget_ratio``: fit the method's
``keep_ratio`` per request so that the real bytes are at most (dense bytes / budget_ratio), measured on
layer 0 (every layer has the same shape) as the cache will hold it (core tensors, or the manager's
pages); only for methods with a keep_ratio (think, naive2d, mosaic); ``policy``: a plan file from
``mosaickv plan --json`` whose per-head keep ratios and per-layer token ratios replace
keep_ratio/token_ratio (method mosaic). With ``cache=manager``: ``cache_threads`` (CPU re-encoders,
default: usable cores - 1), ``max_backlog_tokens`` (default 4096) and ``evict_tokens`` (default
8: decode tokens leave the dense window a selection block at a time), see
``CacheConfig``; the manager's ``stats()`` join the engine's ``stats`` and ``kv_bytes`` is its
``request_stats`` (pages + dense device tensors).
``telemetry_every=N`` (method mosaic; default 0 = off): on the 1st, (N+1)-th, ... prefill, measure
every layer's ``attention_losses`` and energy losses at the planner's keep ratios from the prompt
K/V and query window before they are encoded, and hand the curves to ``telemetry_sink`` (the worker
sends them to the control plane as a ``telemetry`` message); it runs on the engine thread and delays
that request's first token by its ``overhead_s``.
``recall_every=N`` (any method that selects blocks; default 0 = off): on the 1st, (N+1)-th, ... decode
step of the backend (counted over all requests), every layer measures ``decode_recall`` of the step's
query (the share of full attention's mass, over the decompressed keys, that the core selection reads
at each of ``RECALL_TOKEN_RATIOS``) and the sink gets one ``recall`` message; on the engine thread,
inside that step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.core import METHODS, CompressionMethod, KVCache, make_method
from mosaickv.policy import (
    PLAN_KEEP_RATIOS,
    QUERY_WINDOW,
    decode_recall,
    model_shape,
    prompt_curves,
    read_plan,
    recall_body,
    telemetry_body,
)

from .backends import KVBackend

log = logging.getLogger("mosaickv.engines.hf.mosaickv")

ATTENTION_NAME = "mosaickv"
Q_WINDOW = QUERY_WINDOW  # prompt queries kept per layer for ThinK's channel scores and the telemetry
# Decode tokens leave the dense window a selection block (default B) at a time. Fewer than the vLLM
# backend's 256 (MosaicSettings.evict_tokens): every (request, layer) holds a dense buffer of
# n_sink + window + evict_tokens rows, which counts in kv_bytes and the budget fit, and the embedded
# default serves short prompts, where 256 rows would be a large share of the cache.
EVICT_TOKENS = 8
_FIT_STEPS = 12  # bisection steps on keep_ratio: 2**-12 of resolution is far below one element
_current = threading.local()  # the PackedLayer whose update ran last on this thread


class ManagedKV:
    """One (request, layer) held by a CacheManager, with the part of the core ``KVCache`` surface that
    PackedLayer and the attention function use: ``append``, ``attend``, ``length``."""

    def __init__(self, manager: CacheManager, request_id: str, layer: int) -> None:
        self.manager, self.request_id, self.layer = manager, request_id, layer

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [t, H_kv, D] decode tokens."""
        self.manager.append(self.request_id, self.layer, k, v)

    def attend(self, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """q: [H_q, D] -> [H_q, D]."""
        return self.manager.attend([self.request_id], self.layer, q[None], scale)[0]

    @property
    def length(self) -> int:
        return self.manager.tokens(self.request_id, self.layer)

    def core_view(self) -> AbstractContextManager[KVCache]:
        """The layer's current snapshot as a core KVCache (``CacheManager.view``)."""
        return self.manager.view(self.request_id, self.layer)


class DecodeRecallSampler:
    """The ``recall_every`` option: on the 1st, (N+1)-th, ... decode step of the backend (one step =
    one forward through every layer, any request), every layer whose cache selects blocks measures
    ``decode_recall`` of the step's query and the last layer hands one ``recall`` message body to
    ``emit``. Best effort: a failed measurement is logged and the step goes on."""

    def __init__(self, every: int, emit: Callable[[dict[str, Any]], None]) -> None:
        self.every, self.emit = every, emit
        self.n_layers = 0  # set by the backend's prepare
        self._steps = 0
        self._recalls: dict[int, torch.Tensor] | None = None  # layer -> [H_kv, n_ratios] on a sampled step
        self._elapsed = 0.0

    def observe(
        self, layer_idx: int, packed: KVCache | ManagedKV, q: torch.Tensor, scale: float | None
    ) -> None:
        """One layer's decode attention (q: [H_q, D]), after the step's token was appended."""
        if layer_idx == 0:
            self._recalls = {} if self._steps % self.every == 0 else None
            self._steps += 1
            self._elapsed = 0.0
        if self._recalls is None:
            return
        start = time.perf_counter()
        try:  # recall is best effort: it never fails the step it rides on
            if isinstance(packed, ManagedKV):
                with packed.core_view() as cache:
                    self._measure(self._recalls, layer_idx, cache, q, scale)
            else:
                self._measure(self._recalls, layer_idx, packed, q, scale)
        except Exception:
            log.exception("decode recall of this step failed; the step goes on without it")
            self._recalls = None
            return
        self._elapsed += time.perf_counter() - start
        if layer_idx == self.n_layers - 1:
            self._finish(packed.length)

    @staticmethod
    def _measure(
        into: dict[int, torch.Tensor], layer_idx: int, cache: KVCache, q: torch.Tensor, scale: float | None
    ) -> None:
        if cache.method.selects_blocks:  # a layer attending every block has nothing to recall
            into[layer_idx] = decode_recall(cache, q, scale)

    def _finish(self, tokens: int) -> None:
        """The sampled step's last layer: one ``recall`` message over the layers measured."""
        recalls, self._recalls = self._recalls or {}, None
        if recalls:
            layers = sorted(recalls)
            self.emit(recall_body(layers, [recalls[i] for i in layers], tokens, self._elapsed))


class PackedLayer(CacheLayerMixin):
    """One decoder layer's cache: dense K/V ([1, H_kv, T, D]) during prefill, then a core KVCache or
    the layer's handle in a CacheManager."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, recall: DecodeRecallSampler | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.recall = recall  # the backend's recall_every sampler, None when off
        self.packed: KVCache | ManagedKV | None = None
        self.q_window: torch.Tensor | None = None  # [w, H_q, D], recorded by the attention function

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, H_kv, t, D] post-RoPE. Returns what attention reads in prefill
        (the dense K/V so far); at decode the attention function reads the packed cache instead."""
        if key_states.shape[0] != 1:
            raise ValueError(
                f"the mosaickv backend holds one sequence per cache, got batch {key_states.shape[0]}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _current.layer = self
        if self.packed is None:
            if self.keys is not None:
                raise ValueError(
                    "the mosaickv backend prefills in one forward pass; call end_prefill before decoding"
                )
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        self.packed.append(key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states

    def _prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill K/V as [T, H_kv, D]."""
        if self.keys is None or self.values is None:
            raise ValueError(f"layer {self.layer_idx} has no prefill K/V to encode")
        return self.keys[0].transpose(0, 1), self.values[0].transpose(0, 1)

    def encode(self, method: CompressionMethod) -> None:
        """Compress the prefill K/V with `method` into a core KVCache and drop the dense copy."""
        k, v = self._prompt_kv()
        self.packed = method.encode(k, v, q_window=self.q_window)
        self.keys = self.values = self.q_window = None

    def encode_into(self, manager: CacheManager, request_id: str) -> None:
        """Hand the prefill K/V to `manager` (request already added, with this layer's method) and
        drop the dense copy."""
        k, v = self._prompt_kv()
        manager.prefill(request_id, self.layer_idx, k, v)
        self.packed = ManagedKV(manager, request_id, self.layer_idx)
        self.keys = self.values = self.q_window = None

    def get_seq_length(self) -> int:
        if self.packed is not None:
            return self.packed.length
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Real bytes held: the core cache's tensors, or the dense prefill K/V before encoding. A
        managed layer's bytes are counted per request by its manager (``MosaicKVBackend.kv_bytes``)."""
        if isinstance(self.packed, KVCache):
            return self.packed.nbytes
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class PackedCache(Cache):
    """One request's cache: a PackedLayer per decoder layer. ``request_id`` names the request in the
    backend's CacheManager while the manager holds it (from end_prefill to release), else None."""

    def __init__(self, n_layers: int, recall: DecodeRecallSampler | None = None) -> None:
        super().__init__(layers=[PackedLayer(i, recall) for i in range(n_layers)])
        self.request_id: str | None = None


def mosaickv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query: [1, H_q, t, D]; key, value: [1, H_kv, T, D] (prefill). Returns ([1, t, H_q, D], None).

    The positional order (..., attention_mask, dropout, scaling) is SDPA's: kvpress wraps every
    registered attention function and calls it positionally.
    """
    layer = getattr(_current, "layer", None)
    if not isinstance(layer, PackedLayer) or layer.layer_idx != module.layer_idx:
        raise RuntimeError(
            "mosaickv attention needs a PackedCache: build the cache with the mosaickv backend's new_cache"
        )
    if layer.packed is None:
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
        layer.q_window = query[0, :, -Q_WINDOW:].transpose(0, 1).clone()
        return out, weights
    if query.shape[2] != 1:
        raise ValueError(
            f"after prefill the mosaickv backend decodes one token per step, got {query.shape[2]}"
        )
    out = layer.packed.attend(query[0, :, 0], scale=scaling)  # [H_q, D]
    if layer.recall is not None:
        layer.recall.observe(layer.layer_idx, layer.packed, query[0, :, 0], scaling)
    return out[None, None], None


def _parse(value: str) -> Any:
    low = value.strip().lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def fit_keep_ratio(
    name: str,
    params: Mapping[str, Any],
    k: torch.Tensor,
    v: torch.Tensor,
    q_window: torch.Tensor | None,
    budget_ratio: float,
    measure: Callable[[CompressionMethod], int] | None = None,
) -> float:
    """The largest keep_ratio whose real bytes on (k, v) are <= dense bytes / budget_ratio.

    k, v: [T, H_kv, D] one layer's prompt K/V; q_window: [w, H_q, D] or None.
    measure: the real bytes of one layer stored with a method; default the core layout's
        (``method.encode(k, v).nbytes``); the cache manager's pages are measured by ``paged_nbytes``.
    """
    target = k.numel() * k.element_size() * 2 / budget_ratio

    def nbytes(ratio: float) -> int:
        method = make_method(name, **{**params, "keep_ratio": ratio})
        return measure(method) if measure is not None else method.encode(k, v, q_window=q_window).nbytes

    lo, hi = 0.0, 1.0
    if nbytes(1.0 / k.shape[2]) > target:
        raise ValueError(
            f"{name} cannot reach budget_ratio {budget_ratio} on {k.shape[0]} tokens even keeping one "
            "element per vector (fixed costs: sinks, recent window, summaries); lower budget_ratio, the "
            "window or the summary size"
        )
    for _ in range(_FIT_STEPS):
        mid = (lo + hi) / 2
        if nbytes(mid) <= target:
            lo = mid
        else:
            hi = mid
    return max(lo, 1.0 / k.shape[2])


def paged_nbytes(
    scratch: CacheManager, k: torch.Tensor, v: torch.Tensor
) -> Callable[[CompressionMethod], int]:
    """Real bytes of one layer (k, v: [T, H_kv, D]) as a cache manager stores it: whole pages, rows
    padded to the kernels' stride, plus its dense tensors; measured by prefilling a one-layer
    ``scratch`` manager (same page size as the serving one) and freeing the request again."""
    ids = itertools.count()

    def measure(method: CompressionMethod) -> int:
        request_id = f"fit-{next(ids)}"
        scratch.add_request(request_id, [method])
        try:
            scratch.prefill(request_id, 0, k, v)
            return scratch.request_stats(request_id)["kv_bytes"]
        finally:
            scratch.free(request_id)

    return measure


@torch.no_grad()
def prefill_curves(layers: list[PackedLayer], keep_ratios: tuple[float, ...]) -> torch.Tensor:
    """``prompt_curves`` (attention loss, energy loss) of every layer of a prefilled (not yet encoded)
    cache: [L, 2, H_kv, n_ratios]."""
    curves = []
    for layer in layers:
        if layer.q_window is None:
            raise ValueError(f"layer {layer.layer_idx} recorded no query window for attention losses")
        curves.append(prompt_curves(*layer._prompt_kv(), layer.q_window, keep_ratios))
    return torch.stack(curves)


def _cache_config(method: str, params: dict[str, Any]) -> CacheConfig | None:
    """Pops the cache options from `params`: the manager's config, or None for the core path."""
    cache = params.pop("cache", "manager" if method == "mosaic" else "core")
    # backend option -> CacheConfig field
    options = {"cache_threads": "n_threads", "max_backlog_tokens": "max_backlog_tokens",
               "evict_tokens": "evict_tokens"}
    knobs = {key: params.pop(option) for option, key in options.items() if option in params}
    if cache == "core":
        if knobs:
            raise ValueError(f"{', '.join(options)} are options of cache=manager")
        return None
    if cache != "manager":
        raise ValueError(f"cache must be manager or core, got {cache!r}")
    if method != "mosaic":
        raise ValueError(f"cache=manager stores method mosaic only, got {method!r}; use cache=core")
    for key, value in knobs.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    knobs.setdefault("evict_tokens", EVICT_TOKENS)
    return CacheConfig(**knobs)


class MosaicKVBackend(KVBackend):
    """KV backend for the core methods (see the module docstring for options)."""

    name = "mosaickv"

    def __init__(self, options: Mapping[str, str]) -> None:
        params = {k: _parse(v) for k, v in options.items()}
        method = str(params.pop("method", "mosaic"))
        if method not in METHODS:
            raise ValueError(
                f"unknown method {method!r} for the mosaickv backend; allowed: {', '.join(METHODS)}"
            )
        self.cache_config = _cache_config(method, params)
        self.policy_file: str | None = params.pop("policy", None)
        if self.policy_file is not None and (method != "mosaic" or "budget_ratio" in params):
            raise ValueError(
                "policy=FILE (a `mosaickv plan --json` plan) sets method mosaic's per-head keep "
                "ratios; it goes without budget_ratio and with method mosaic only"
            )
        every = params.pop("telemetry_every", 0)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"telemetry_every must be an integer >= 0, got {every!r}")
        if every and method != "mosaic":
            raise ValueError(f"telemetry_every measures method mosaic's curves; got method {method!r}")
        self.telemetry_every: int = every
        recall_every = params.pop("recall_every", 0)
        if not isinstance(recall_every, int) or isinstance(recall_every, bool) or recall_every < 0:
            raise ValueError(f"recall_every must be an integer >= 0, got {recall_every!r}")
        self.recall = DecodeRecallSampler(recall_every, self._emit) if recall_every else None
        # Called on the engine thread with {head_dim, dtype, keep_ratios, curves, tokens, overhead_s}.
        self.telemetry_sink: Callable[[dict[str, Any]], None] | None = None
        self._prefills = 0
        self._shape: tuple[int, str] = (0, "float32")  # head_dim, dtype name; set by prepare
        budget = params.pop("budget_ratio", None)
        if budget is not None:
            if not isinstance(budget, (int, float)) or budget < 1:
                raise ValueError(f"budget_ratio must be a number >= 1, got {budget!r}")
            if method not in ("think", "naive2d", "mosaic") or params.get("keep_ratio", 0.25) is None:
                raise ValueError(
                    f"budget_ratio fits keep_ratio, which method {method!r} does not use as set; "
                    "use it with think, naive2d or mosaic (with a fixed keep_ratio)"
                )
            params.pop("keep_ratio", None)
        self.method = method
        self.params: dict[str, Any] = params
        self.budget_ratio: float | None = None if budget is None else float(budget)
        self.last_keep_ratio: float | None = params.get("keep_ratio")
        self._method = make_method(method, **params)  # validates the parameters now, before any request
        if self.recall is not None and not self._method.selects_blocks:
            raise ValueError(
                f"recall_every measures block selection; method {method!r} as set attends every block "
                "(use a method that compresses, with token_ratio < 1)"
            )
        self._layer_methods: dict[int, CompressionMethod] = {}
        self.manager: CacheManager | None = None  # made by prepare when cache=manager
        self._fit_manager: CacheManager | None = None  # one layer, for budget_ratio fits on pages
        self._request_ids = itertools.count()

    def set_layer_params(self, layer_params: Mapping[int, Mapping[str, Any]]) -> None:
        """Per-layer parameter overrides (a segment policy), validated now and used by every prefill
        that ends after this call; replaced as a whole, so a prefill sees the old or the new policy."""
        self._layer_methods = {
            i: make_method(self.method, **{**self.params, **p}) for i, p in layer_params.items()
        }

    def prepare(self, model: PreTrainedModel) -> None:
        AttentionInterface.register(ATTENTION_NAME, mosaickv_attention)
        model.set_attn_implementation(ATTENTION_NAME)
        shape = model_shape(model, "")
        self._shape = (int(shape["headDim"]), str(shape["dtype"]))
        if self.recall is not None:
            self.recall.n_layers = int(shape["nLayers"])
        if self.policy_file is not None:
            self.set_layer_params(read_plan(self.policy_file, shape["nLayers"], shape["nKvHeads"]))
        if self.cache_config is not None and self.manager is None:
            self.manager = CacheManager.for_model(
                model.config, model.dtype, model.device, self.cache_config, **self.params
            )
            if self.budget_ratio is not None:  # budgets are fitted on the pages the manager allocates
                self._fit_manager = CacheManager(
                    self._method,
                    1,
                    self.manager.n_kv_heads,
                    self.manager.head_dim,
                    model.dtype,
                    model.device,
                    CacheConfig(page_bytes=self.manager.pool.page_bytes, n_threads=1),
                )

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return PackedCache(model.config.num_hidden_layers, self.recall)

    def _emit(self, message: dict[str, Any]) -> None:
        """A sampled step's ``recall`` message body -> the worker (dropped while no sink is set)."""
        if self.telemetry_sink is not None:
            self.telemetry_sink(message)

    def end_prefill(self, cache: Cache) -> None:
        layers = [layer for layer in cache.layers if isinstance(layer, PackedLayer)]
        if not isinstance(cache, PackedCache) or len(layers) != len(cache.layers):
            raise TypeError("end_prefill expects the PackedCache made by this backend's new_cache")
        method = self._method
        if self.budget_ratio is not None:
            first = layers[0]
            if first.keys is None or first.values is None:
                raise ValueError("end_prefill called before a prefill filled the cache")
            k0, v0 = first._prompt_kv()
            measure = None if self._fit_manager is None else paged_nbytes(self._fit_manager, k0, v0)
            ratio = fit_keep_ratio(
                self.method, self.params, k0, v0, first.q_window, self.budget_ratio, measure
            )
            self.last_keep_ratio = ratio
            method = make_method(self.method, **{**self.params, "keep_ratio": ratio})
        if self.telemetry_every and self.telemetry_sink is not None:
            sampled = self._prefills % self.telemetry_every == 0
            self._prefills += 1
            if sampled:
                try:  # telemetry is best effort: it never fails the request it rides on
                    self.telemetry_sink(self.measure_telemetry(layers))
                except Exception:
                    log.exception("telemetry of this prefill failed; the request goes on without it")
        per_layer = self._layer_methods  # one policy for the whole prefill (see set_layer_params)
        methods = [per_layer.get(i, method) for i in range(len(layers))]
        if self.cache_config is None:
            for layer, m in zip(layers, methods, strict=True):
                layer.encode(m)
            return
        if self.manager is None:
            raise RuntimeError("cache=manager needs prepare(model) before the first request")
        request_id = f"hf-{next(self._request_ids)}"
        self.manager.add_request(request_id, methods)
        cache.request_id = request_id  # from here on release_cache frees it, whatever happens next
        for layer in layers:
            layer.encode_into(self.manager, request_id)

    def measure_telemetry(self, layers: list[PackedLayer]) -> dict[str, Any]:
        """Per layer x KV head, ``attention_losses`` and energy losses at PLAN_KEEP_RATIOS of this
        prefill (the layers still hold the dense K/V and the query window): a ``telemetry`` message
        without worker_id and model."""
        start = time.perf_counter()
        curves = prefill_curves(layers, PLAN_KEEP_RATIOS)
        tokens = int(layers[0]._prompt_kv()[0].shape[0])
        return telemetry_body(curves, *self._shape, tokens, time.perf_counter() - start)

    def kv_bytes(self, cache: Cache) -> int:
        if isinstance(cache, PackedCache) and cache.request_id is not None and self.manager is not None:
            return self.manager.request_stats(cache.request_id)["kv_bytes"]
        return sum(layer.nbytes for layer in cache.layers if isinstance(layer, PackedLayer))

    def release_cache(self, cache: Cache) -> None:
        """Every page of the request back to the manager's pool (nothing to do on the core path)."""
        if isinstance(cache, PackedCache) and cache.request_id is not None and self.manager is not None:
            self.manager.free(cache.request_id)
            cache.request_id = None

    def stats(self) -> dict[str, int | float]:
        """The manager's ``stats()`` (``cache_*``: pages, bytes, backlog, re-encodes), if it runs."""
        return self.manager.stats() if self.manager is not None else {}

    def close(self) -> None:
        for manager in (self.manager, self._fit_manager):
            if manager is not None:
                manager.close()
        self.manager = self._fit_manager = None
