"""MosaicKV reference algorithm in PyTorch: the contract the CUDA kernels and engines match.

One cache = one sequence x one layer. Layout (docs/FORMAT.md makes it byte-precise):
sinks (first ``n_sink`` tokens, dense) + compressed segments + dense tail (pending tokens and the
recent ``window``). Every method shares that plumbing (``KVCache``); a method only decides how a
segment is stored and summarised.

Public interface (used by ops/, cache/, engines/)::

    from mosaickv.core import make_method
    m = make_method("mosaic", keep_ratio=0.25, token_ratio=0.10)  # full quest think naive2d mosaic
    cache = m.encode(k, v, q_window=None)  # k, v: [T, H_kv, D] post-RoPE; q_window: [w, H_q, D]
    cache.append(k_new, v_new)             # [t, H_kv, D], t >= 0
    idx = cache.select_blocks(q)           # q: [H_q, D] -> [H_kv, n_sel] global block ids (int64)
    out = cache.attend(q, scale=None)      # [H_q, D] in q's dtype; scale defaults to D**-0.5
    cache.nbytes                           # bytes of every tensor the cache holds

Stage-by-stage helpers for kernel checks: ``packing`` (pack/unpack/popcount of bitmaps),
``rotation`` (incremental covariance, eigenvector rotations), ``summaries`` (block summaries,
GQA-shared scores, global top-k), ``attention`` (PackedAttention per part + log-sum-exp merge),
``strategy`` (per-segment candidate search).
"""

from mosaickv.core.attention import merge_parts, packed_part
from mosaickv.core.base import CompressionMethod, KVCache
from mosaickv.core.methods import METHODS, make_method
from mosaickv.core.packing import (
    bitmap_positions,
    bitmap_words,
    pack_topk,
    popcount,
    unpack_bitmap,
    unpack_values,
)
from mosaickv.core.rotation import CovarianceAccumulator, rotation_from_moment
from mosaickv.core.segment import PackedSide, Segment
from mosaickv.core.strategy import Strategy, candidate_strategies, energy_losses, search_strategy
from mosaickv.core.summaries import SUMMARY_KINDS, block_summaries, score_blocks, select_top_blocks

__all__ = [
    "METHODS",
    "SUMMARY_KINDS",
    "CompressionMethod",
    "CovarianceAccumulator",
    "KVCache",
    "PackedSide",
    "Segment",
    "Strategy",
    "bitmap_positions",
    "bitmap_words",
    "block_summaries",
    "candidate_strategies",
    "energy_losses",
    "make_method",
    "merge_parts",
    "pack_topk",
    "packed_part",
    "popcount",
    "rotation_from_moment",
    "score_blocks",
    "search_strategy",
    "select_top_blocks",
    "unpack_bitmap",
    "unpack_values",
]
