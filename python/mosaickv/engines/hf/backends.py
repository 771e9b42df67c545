"""KV-cache backends of the hf engine: the seam where MosaicKV plugs into transformers.

A backend decides how one request's KV cache is held. The engine's decode loop calls, per request:
`new_cache` before prefill, the model forward with that cache (prefill, then one token per step),
`end_prefill` once the prompt's KV is in the cache, `kv_bytes` to report real memory, and
`release_cache` when the request ends, however it ends (finished, cancelled, failed, shutdown).
`prepare` runs once after the model is loaded (e.g. to register an AttentionInterface function),
`stats` adds the backend's numbers to the engine's `stats`, and `close` runs once when the engine
stops.

- ``stock``: transformers' DynamicCache, dense, in the model's dtype.
- ``mosaickv``: the compressed cache of the core methods (a Cache subclass whose `end_prefill`
  encodes the prompt's KV, plus an attention function over the packed form; for method mosaic the
  packed form lives in the backend's cache manager; `options` carries the method and its parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from mosaickv.protocol import MosaicError


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (views share storage)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class KVBackend:
    """The stock backend and the base of every other one: a dense DynamicCache."""

    name = "stock"
    method: str | None = None
    """The compression method reported in `hello` (None for a dense cache)."""

    def __init__(self, options: Mapping[str, str]) -> None:
        if options:
            raise ValueError(f"backend {self.name!r} takes no options, got {', '.join(sorted(options))}")

    def prepare(self, model: PreTrainedModel) -> None:
        """Once, after loading: nothing to do for a dense cache."""

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return DynamicCache(config=model.config)

    def end_prefill(self, cache: Cache) -> None:
        """The prompt's KV is in `cache`: a compressing backend encodes it here."""

    def kv_bytes(self, cache: Cache) -> int:
        """Real bytes held by `cache`: the storage of its key and value tensors."""
        return storage_bytes(
            t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)
        )

    def release_cache(self, cache: Cache) -> None:
        """The request of `cache` ended: free what the backend holds for it beyond the object itself."""

    def stats(self) -> dict[str, int | float]:
        """Backend numbers for the engine's `stats` map (str -> number)."""
        return {}

    def close(self) -> None:
        """Once, when the engine stops (after every request has ended)."""


def full_kv_bytes(model: PreTrainedModel, tokens: int) -> int:
    """Bytes of a dense cache of `tokens` tokens in the model's dtype: K and V of
    [num_kv_heads, tokens, head_dim] per layer."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * tokens * head_dim * itemsize


BACKENDS: dict[str, type[KVBackend]] = {"stock": KVBackend}


def make_backend(name: str, options: Mapping[str, str] | None = None) -> KVBackend:
    """The backend `name` with its options (from `--backend-option KEY=VALUE`)."""
    if name == "mosaickv" and name not in BACKENDS:
        # Imported on first use: it imports this module (KVBackend) and the core methods.
        from .mosaickv_backend import MosaicKVBackend

        BACKENDS[name] = MosaicKVBackend
    if name == "kvpress" and name not in BACKENDS:
        # The outside peer (needs the kvpress package, see mosaickv/eval/peers.py).
        from mosaickv.eval.peers import KvpressBackend

        BACKENDS[name] = KvpressBackend
    if name not in BACKENDS:
        raise MosaicError(
            "unsupported", f"unknown backend {name!r} for the hf engine; allowed: stock, mosaickv, kvpress"
        )
    try:
        return BACKENDS[name](options or {})
    except ValueError as exc:
        raise MosaicError("unsupported", str(exc)) from exc
