"""MosaicKV settings for the vLLM backend and the packed page size they imply (no vLLM import).

vLLM has no sanctioned way to hand configuration to a plugin backend, so the settings come from
one environment variable, read in every vLLM process (API server, engine core, workers):

    MOSAICKV_VLLM_CONFIG='{"keep_ratio": 0.25, "group": 1, "token_ratio": 0.1}'

Keys are ``mosaickv.core`` MosaicMethod parameters plus ``cache`` (``core``, the default: each
layer keeps its own core caches; ``manager``: every layer of a worker process stores and attends
through one ``mosaickv.cache.CacheManager``, engines/vllm/cache.py) and ``telemetry_every`` /
``recall_every`` (planner curves of every N-th prefill / decode step, engines/vllm/telemetry.py)
and, with ``manager``, ``evict_tokens`` (decode tokens that leave the dense window at a time);
unknown keys are an error. The page size is derived from the same settings, so every process
sizes pages identically.
"""

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from mosaickv.core import bitmap_words
from mosaickv.core.methods.mosaic import MosaicMethod
from mosaickv.core.packing import check_group
from mosaickv.core.strategy import fixed_strategy
from mosaickv.core.summaries import summary_width

ENV_VAR = "MOSAICKV_VLLM_CONFIG"
CACHES = ("core", "manager")
PAGE_TARGET_BYTES = 4096
"""With ``cache: manager`` the manager's pages are cut out of vLLM's KV cache at about this size
(``engines/vllm/cache.page_storage``); the page size of the spec is measured with it."""


@dataclass(frozen=True)
class MosaicSettings:
    """The compression a vLLM deployment runs with (one value for every layer).

    keep_ratio must be fixed (not None): a vLLM page has one size, so the per-stripe strategy
    search, whose keep count varies per segment, cannot be paged and is refused.
    """

    keep_ratio: float = 0.25
    group: int = 1
    token_ratio: float = 0.10
    block_size: int = 8
    n_sink: int = 4
    window: int = 64
    segment_len: int = 1024
    summary: str = "minmax"
    summary_channels: int = 32
    cache: str = "manager"
    # cache: manager only: page room beyond a closed segment's measured bytes (see state_bytes)
    arena_reserve: float = 0.1
    # cache: manager only: decode tokens leave the dense window this many at a time
    # (CacheConfig.evict_tokens). An eviction's decode-path work (the temporary segment's append,
    # the host copy, the CPU job, the layer's table rebuild) costs about the same for 8 tokens as for
    # 256, so fewer, larger evictions cut the manager's overhead per step: at 128K tokens, batch 1,
    # 0.9 ms (12 %) against 2.4 ms with 64 and 7.2 ms with 8 (bench/decode/README.md). The price is
    # device memory outside vLLM's KV cache: each (request, layer) holds a dense buffer of
    # n_sink + window + evict_tokens rows, 1.3 MB at 8 KV heads x 128, bf16.
    evict_tokens: int = 256
    # On the 1st, (N+1)-th, ... prefill (decode step) of the engine core, the planner's curves
    # (block-selection recall) go to the worker (engines/vllm/telemetry.py); 0: off.
    telemetry_every: int = 0
    recall_every: int = 0

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {self.cache!r}")
        if not 0.0 <= self.arena_reserve <= 1.0:
            raise ValueError(f"arena_reserve must be in [0, 1], got {self.arena_reserve}")
        for name, least in (("telemetry_every", 0), ("recall_every", 0), ("evict_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        # The core checks g against a head dim only at encode time; every D the backend accepts is a
        # multiple of 4, so checking against D = 4 refuses a bad g here, in every vLLM process.
        check_group(4, self.group)
        self.make_method()

    def make_method(self, **overrides: Any) -> MosaicMethod:
        """The core method these settings describe (validates every value); ``overrides``: mosaic
        parameters a policy sets for one layer (keep_ratio, head_keep_ratios, token_ratio)."""
        params = asdict(self)
        # where the caches live and what is sent: not the method's parameters
        for not_method in ("cache", "telemetry_every", "recall_every", "arena_reserve", "evict_tokens"):
            del params[not_method]
        return MosaicMethod(**{**params, **overrides})

    def token_head_bytes(self, head_size: int, dtype: torch.dtype) -> float:
        """Packed bytes of one token of one KV head in a compressed segment (may be fractional).

        K and V: kept values (k = keep_ratio * D, a multiple of g) in the storage dtype plus a
        [W] uint32 bitmap; the K side's block summary amortised over B tokens; the segment's two
        D x D float32 rotations amortised over segment_len tokens.
        """
        elem = torch.empty(0, dtype=dtype).element_size()
        keep = fixed_strategy(head_size, self.keep_ratio, self.group, None).keep
        row = keep * elem + 4 * bitmap_words(head_size, self.group)
        summary = 0.0
        if self.token_ratio < 1.0:
            summary = summary_width(self.summary, head_size, self.summary_channels) * elem / self.block_size
        rotations = 2 * head_size * head_size * 4 / self.segment_len
        return 2 * row + summary + rotations

    def state_bytes(self, head_size: int, dtype: torch.dtype) -> int:
        """Bytes per (token, KV head) cell of a vLLM page, a multiple of the storage dtype's size so
        vLLM can view the page in that dtype.

        ``cache: core``: ``token_head_bytes`` (the packed bytes live beside vLLM's pages).
        ``cache: manager``: the packed bytes live in vLLM's pages, so a cell holds what the manager
        really takes per token (``paged_token_head_bytes``) plus ``arena_reserve`` for what a
        closed full-length segment does not show: each request's partly filled last pages and
        temporary segment, segments closed early on drift (more rotations per token).
        """
        elem = torch.empty(0, dtype=dtype).element_size()
        if self.cache == "manager":
            need = paged_token_head_bytes(self, head_size, dtype) * (1.0 + self.arena_reserve)
        else:
            need = self.token_head_bytes(head_size, dtype)
        return math.ceil(need / elem) * elem

    @classmethod
    def from_env(cls) -> "MosaicSettings":
        raw = os.environ.get(ENV_VAR, "")
        if not raw.strip():
            return cls()
        try:
            given = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV_VAR} must be a JSON object, got {raw!r}: {err}") from err
        if not isinstance(given, dict):
            raise ValueError(f"{ENV_VAR} must be a JSON object, got {type(given).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if given.get("keep_ratio", 0.25) is None:
            raise ValueError(
                f"{ENV_VAR}: keep_ratio must be a number: vLLM pages have one size, so "
                "the per-segment strategy search (keep_ratio null) cannot be paged"
            )
        return cls(**given)


@functools.cache
def paged_token_head_bytes(settings: MosaicSettings, head_size: int, dtype: torch.dtype) -> float:
    """Pool bytes per token and KV head of one closed full-length segment as the cache manager
    stores it (rows padded to the kernels' stride, rotations and summary, whole pages of
    PAGE_TARGET_BYTES): measured by prefilling one random segment of one head into a scratch
    manager, not modelled."""
    from mosaickv.cache import CacheConfig, CacheManager  # the manager is only needed here

    method = settings.make_method(n_sink=0, window=0)  # one closed segment, nothing dense
    n = settings.segment_len
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(n, 1, head_size, generator=gen).to(dtype) for _ in range(2))
    scratch = CacheManager(
        method, 1, 1, head_size, dtype, "cpu", CacheConfig(page_bytes=PAGE_TARGET_BYTES, n_threads=1)
    )
    try:
        scratch.add_request("measure")
        scratch.prefill("measure", 0, k, v)
        return scratch.request_stats("measure")["page_bytes"] / n
    finally:
        scratch.close()
