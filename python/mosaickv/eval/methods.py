"""The methods an evaluation compares, each as an hf-engine KV backend, and one prefill for all.

Method names (the A/B's ``--methods``):
- ``full``: the stock dense DynamicCache;
- ``quest``, ``think``, ``naive2d``, ``mosaic``: the core methods through the ``mosaickv`` backend,
  optionally with parameters, ``mosaic:summary=mean:window=32``; think/naive2d/mosaic without an
  explicit keep_ratio get theirs fitted to the budget (real bytes <= dense / budget_ratio);
- ``kvpress:<press>``: the outside peer (mosaickv.eval.peers), at the same budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from mosaickv.core import METHODS
from mosaickv.engines.hf.backends import KVBackend
from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend
from mosaickv.eval import peers

_FITTED = ("think", "naive2d", "mosaic")  # methods whose keep_ratio sets their memory


def make_method_backend(method: str, budget_ratio: float) -> KVBackend:
    """The KV backend that runs `method` (see the module docstring) at `budget_ratio`."""
    if method == "full":
        return KVBackend({})
    if method.startswith("kvpress:"):
        return peers.KvpressBackend({"press": method.split(":", 1)[1], "budget_ratio": str(budget_ratio)})
    name, *pairs = method.split(":")
    if name not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; known: full, {', '.join(METHODS)} (with :key=value parameters), "
            f"kvpress:<{'|'.join(peers.press_names())}>"
        )
    options = {"method": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"method parameter {pair!r} in {method!r} must be key=value")
        options[key] = value
    if name in _FITTED and "keep_ratio" not in options and "policy" not in options:
        options["budget_ratio"] = str(budget_ratio)
    # The core reference, synchronously: what the method computes, not the serving path's timing
    # (``mosaic:cache=manager`` runs the cache manager instead).
    options.setdefault("cache", "core")
    return MosaicKVBackend(options)


@contextmanager
def installed(backend: KVBackend, model: PreTrainedModel) -> Iterator[None]:
    """The backend's model-wide setup (attention function, hooks) for the block, then undone."""
    saved = model.config._attn_implementation
    backend.prepare(model)
    try:
        yield
    finally:
        release = getattr(backend, "release", None)
        if release is not None:
            release()
        backend.close()
        model.set_attn_implementation(saved)


@dataclass(frozen=True)
class Prefilled:
    """A cache after prefill. logits: [vocab] at the last prompt position; kv_bytes: real bytes."""

    cache: object
    logits: torch.Tensor
    kv_bytes: int


@torch.inference_mode()
def prefill(model: PreTrainedModel, backend: KVBackend, ids: torch.Tensor) -> Prefilled:
    """ids: [1, T] int64. The same sequence as the hf engine: new_cache, forward, end_prefill."""
    cache = backend.new_cache(model)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    backend.end_prefill(cache)
    return Prefilled(cache, logits[0, -1], backend.kv_bytes(cache))
