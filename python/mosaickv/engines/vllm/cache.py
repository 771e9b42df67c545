"""The vLLM adapter of the cache manager (no vLLM import): one ``mosaickv.cache.CacheManager`` per
vLLM worker process, spoken to in the backend's terms (docs/CACHE.md, "Adapters").

``MosaicKVAttentionImpl`` (backend.py) sees, per step and layer, rows ``(request key, first token,
end token, cached tokens)``: the key is the request's first physical KV block, unique among live
requests because prefix caching is off. The adapter maps each key to a manager request:

- a row with 0 cached tokens is a new prompt. The first layer to see it in a step opens a manager
  request for the key, freeing the one that held the key before (vLLM reused a finished request's
  first block); the other layers of the same step prefill into it. A step is told apart by its
  metadata object (vLLM builds one per step and hands it to every layer of the KV cache group).
- a row with cached tokens appends its one decode token; ``attend`` reads the decode rows.
- ``release(key)`` frees a request whose end is known (every page back to the pool).

With ``cache: manager`` (MosaicSettings) the impl uses the process-wide adapter of ``shared``: its
layers are the MosaicKV attention layers of the worker's model in construction order (vLLM's
static forward context), and the plugin's wrapper of the model runner's request-removal hook calls
``release_block`` when vLLM drops a finished request (docs/CACHE.md, "Adapters").
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.cache.upload import to_device
from mosaickv.core import CompressionMethod, KVCache
from mosaickv.engines.vllm.config import PAGE_TARGET_BYTES, MosaicSettings

Row = tuple[int, int, int, int]
"""(request key, first token, end token, cached tokens) of one request in a step."""


def _index(x: torch.Tensor, rows: Sequence[int]) -> slice | torch.Tensor:
    """Rows of a step's token tensor as a slice when they are consecutive (vLLM puts the decode
    rows first), else as an index tensor sent without waiting for the device (``to_device``)."""
    if all(b - a == 1 for a, b in itertools.pairwise(rows)):
        return slice(rows[0], rows[0] + len(rows))
    return to_device(torch.tensor(rows), x.device)


def select_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] along the first dimension (``_index``)."""
    return x[_index(x, rows)]


def put_rows(out: torch.Tensor, rows: Sequence[int], values: torch.Tensor) -> None:
    """out[rows] = values along the first dimension (``_index``)."""
    out[_index(out, rows)] = values


class VllmCacheAdapter:
    """One CacheManager for every MosaicKV layer of a vLLM worker process (see the module docstring)."""

    def __init__(self, manager: CacheManager) -> None:
        self.manager = manager
        self._requests: dict[int, str] = {}  # request key -> manager request id
        self._opened_by: dict[int, object] = {}  # request key -> the step that opened its request
        self._ids = itertools.count()
        self.layers: dict[str, int] = {}  # vLLM layer name -> manager layer (set by ``shared``)

    def layer(self, name: str) -> int:
        """The manager layer of a vLLM attention layer."""
        index = self.layers.get(name)
        if index is None:
            raise RuntimeError(
                f"MosaicKV cache manager has no layer {name!r}: it was made for {len(self.layers)} "
                "layers, the MosaicKV layers the worker had when its first step ran"
            )
        return index

    @classmethod
    def from_settings(
        cls,
        settings: MosaicSettings,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        config: CacheConfig | None = None,
        storage: Sequence[torch.Tensor] = (),
    ) -> VllmCacheAdapter:
        method = settings.make_method()
        return cls(CacheManager(method, n_layers, n_kv_heads, head_dim, dtype, device, config, storage))

    def _request(self, key: int) -> str:
        request_id = self._requests.get(key)
        if request_id is None:
            raise RuntimeError(
                f"MosaicKV has no cache for the request in block {key}: its prompt was never stored"
            )
        return request_id

    def _open(self, step: object, key: int, methods: Sequence[CompressionMethod] | None) -> str:
        """The manager request for a prompt of `step` in `key`, opened by the first layer to ask
        (with ``methods``, one per layer, or the manager's default)."""
        if self._opened_by.get(key) is step:
            return self._requests[key]
        if key in self._requests:
            self.release(key)
        request_id = f"vllm-{next(self._ids)}"
        self.manager.add_request(request_id, methods)
        self._requests[key], self._opened_by[key] = request_id, step
        return request_id

    def store(
        self,
        step: object,
        layer: int,
        rows: Sequence[Row],
        key: torch.Tensor,
        value: torch.Tensor,
        methods: Sequence[CompressionMethod] | None = None,
    ) -> None:
        """do_kv_cache_update for one layer: key, value [num_tokens, H_kv, D] post-RoPE, the step's
        tokens in row order; `step` is the step's metadata object; a prompt's request is opened with
        ``methods`` (one per layer: a policy's) or the manager's default method."""
        decode_ids, decode_rows = [], []
        for req, lo, hi, cached in rows:
            if cached == 0:
                self.manager.prefill(self._open(step, req, methods), layer, key[lo:hi], value[lo:hi])
            elif hi - lo != 1:
                raise NotImplementedError(
                    f"MosaicKV got {hi - lo} new tokens for a request with {cached} cached ones (chunked "
                    "prefill or speculative decoding)"
                )
            else:
                decode_ids.append(self._request(req))
                decode_rows.append(lo)
        if decode_rows:
            self.manager.append_batch(decode_ids, layer, *(select_rows(x, decode_rows) for x in (key, value)))

    def attend(self, layer: int, keys: Sequence[int], q: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of one layer: q [B, H_q, D], one row per request key -> [B, H_q, D]."""
        return self.manager.attend([self._request(k) for k in keys], layer, q, scale)

    def view(self, layer: int, key: int) -> AbstractContextManager[KVCache]:
        """The request's cache in one layer as a core KVCache (``CacheManager.view``)."""
        return self.manager.view(self._request(key), layer)

    def release(self, key: int) -> None:
        """The request in `key` ended: every page it holds goes back to the pool."""
        self.manager.free(self._requests.pop(key))
        self._opened_by.pop(key, None)

    def discard(self, key: int) -> bool:
        """``release`` if a request holds `key` (idempotent); True when one did."""
        if key not in self._requests:
            return False
        self.release(key)
        return True

    def held(self) -> list[int]:
        """Keys of the requests the adapter holds."""
        return list(self._requests)

    def kv_bytes(self, key: int) -> int:
        """Real device bytes of one request (pages + dense tensors), ``request_stats``' kv_bytes."""
        return self.manager.request_stats(self._request(key))["kv_bytes"]

    def stats(self) -> dict[str, int | float]:
        return self.manager.stats()

    def close(self) -> None:
        self.manager.close()
        self._requests.clear()
        self._opened_by.clear()


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one contiguous address range (in any dimension order)."""
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    return all(st > 0 for st in t.stride()) and span == t.numel()


def page_storage(kv_caches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """vLLM's per-layer KV cache views -> the manager pool's storage and page size.

    Each view is [num_blocks, H, N, C] in vLLM's layout (``create_kv_cache_views``): a block of a
    layer is one dense page in the block- or layer-major layouts, one dense slab per head when
    heads are outermost (LHBNC). Returns one [num_blocks, unit bytes] uint8 view per layer (or per
    layer and head), rows strided as vLLM placed them, and pages that cut a unit into equal parts.
    """
    views = []
    for t in kv_caches:
        elem = t.element_size()
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        if _dense(t[0]):
            starts = [t.storage_offset()]
            unit = t[0].numel() * elem
        elif _dense(t[0, 0]):
            starts = [t.storage_offset() + h * t.stride(1) for h in range(t.shape[1])]
            unit = t[0, 0].numel() * elem
        else:
            raise ValueError(
                f"MosaicKV cannot place pages in a KV cache view of shape {tuple(t.shape)} and strides "
                f"{t.stride()}: neither a block nor a head's block is contiguous; set "
                "VLLM_KV_CACHE_LAYOUT=LBHNC"
            )
        views += [
            raw.as_strided((t.shape[0], unit), (t.stride(0) * elem, 1), start * elem) for start in starts
        ]
    unit = views[0].shape[1]
    per_unit = -(-unit // PAGE_TARGET_BYTES)
    return views, unit // per_unit // 16 * 16


_shared: VllmCacheAdapter | None = None
_shared_lock = threading.Lock()


def shared(
    settings: MosaicSettings,
    layer_names: Sequence[str],
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kv_caches: Sequence[torch.Tensor] = (),
) -> VllmCacheAdapter:
    """The worker process's adapter, made by the first caller: one manager layer per name in
    `layer_names` (the MosaicKV layers in construction order); later callers get the same one.

    ``kv_caches``: vLLM's KV cache view of each of those layers; the manager's pages are carved
    out of them (``page_storage``), so the packed bytes live in the memory vLLM sized for them.
    Without them (a test that binds no cache) the manager allocates its own pages.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            storage, page_bytes = page_storage(kv_caches) if kv_caches else ([], None)
            adapter = VllmCacheAdapter.from_settings(
                settings,
                len(layer_names),
                n_kv_heads,
                head_dim,
                dtype,
                device,
                CacheConfig(page_bytes=page_bytes, evict_tokens=settings.evict_tokens),
                storage,
            )
            adapter.layers = {name: i for i, name in enumerate(layer_names)}
            _shared = adapter
        return _shared


def current() -> VllmCacheAdapter | None:
    """The process-wide adapter, if a step has made one."""
    return _shared


def release_block(key: int) -> bool:
    """vLLM dropped the request whose first block is `key`: free its manager request, if any
    (idempotent; a no-op before the first step or with ``cache: core``)."""
    with _shared_lock:
        adapter = _shared
    return adapter.discard(key) if adapter is not None else False


def close_shared() -> None:
    """Stop and forget the process-wide adapter (tests; a new one is made by the next step)."""
    global _shared
    with _shared_lock:
        adapter, _shared = _shared, None
    if adapter is not None:
        adapter.close()
